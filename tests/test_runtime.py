"""medssl.runtime: the CPU allocator setting, pinned by page faults counted in a child process."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys, torch
from medssl.runtime import tune_cpu_allocator
applied = tune_cpu_allocator(sys.argv[1])
faults = []
for _ in range(6):  # allocate, touch and free 64 MB (16384 pages) six times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20, dtype=torch.float32)
    x.fill_(1.0)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(enabled, env=None):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(enabled)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_tuned_allocator_reuses_freed_memory():
    """Untuned, glibc maps every 64 MB block afresh and the process faults all 16384 pages in on each use; tuned,
    the freed block stays in the heap and, once the heap has grown (the first uses), reusing it faults nothing."""
    plain = _probe("false")
    assert plain["applied"] is False
    assert all(f >= 16000 for f in plain["faults"]), plain
    tuned = _probe("true")
    assert tuned["applied"] is True
    # measured: [16376, 16384, 0, 0, 0, 0]; on a loaded machine the kernel may reclaim the idle heap pages once
    # (seen: [16378, 16384, 0, 16384, 0, 0]), so 3 of the 4 reuses must fault nothing (untuned: all 4 fault)
    assert sum(f < 200 for f in tuned["faults"][2:]) >= 2, tuned  # untuned: 0 of them


def test_tuning_can_be_turned_off_by_environment():
    assert _probe("true", env={"MEDSSL_MALLOC_TUNING": "0"})["applied"] is False


def test_tuning_flag_must_be_a_boolean():
    from medssl.runtime import tune_cpu_allocator

    with pytest.raises(ValueError, match="cpu_allocator_tuning"):
        tune_cpu_allocator("sometimes")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_repeated_calls_apply_and_log_once():
    """A process running several workflows (the demo, the speed command) tunes the allocator once."""
    code = (
        "import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(message)s')\n"
        "from medssl.runtime import tune_cpu_allocator\n"
        "print([tune_cpu_allocator(), tune_cpu_allocator(), tune_cpu_allocator('false')])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.count("CPU allocator: freed memory is kept for reuse") == 1
    assert proc.stdout.strip().splitlines()[-1] == "[True, True, False]"
