#!/usr/bin/env bash
# Make .venv-deploy, the MONAI Deploy environment: the App SDK with Holoscan and their own dependencies (pinned by
# constraints-deploy.txt, about 590 MB) in a venv of their own, reusing .venv for torch, MONAI's dependencies and
# medssl instead of a third copy of torch (about 1.2 GB and 2.5 minutes more): a .pth file adds .venv's site-packages
# after the venv's own. MONAI itself is installed here as well (its code only, about 15 MB) because the SDK's
# monai.deploy must live in the same monai package folder as MONAI's modules. Run from anywhere once .venv exists:
#   bash apps/deploy/make_env.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv/bin/python ]; then
    echo "make_env.sh: .venv/bin/python not found; create .venv first (README, 'Two commands')" >&2
    exit 1
fi
python3 -m venv .venv-deploy
same=$(.venv/bin/python -c 'import sys; print(sys.version_info[:2])')
if [ "$(.venv-deploy/bin/python -c 'import sys; print(sys.version_info[:2])')" != "$same" ]; then
    echo "make_env.sh: python3 is not .venv's Python $same; .venv-deploy must use the same version" >&2
    exit 1
fi
.venv-deploy/bin/pip install -q -c constraints-deploy.txt monai-deploy-app-sdk
monai=$(.venv/bin/python -c 'import monai; print(monai.__version__)')
.venv-deploy/bin/pip install -q --no-deps --ignore-installed "monai==$monai"
venv_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
deploy_site=$(.venv-deploy/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$venv_site')" > "$deploy_site/medssl_venv.pth"
.venv-deploy/bin/python -c 'import monai.deploy, torch, medssl; print("MONAI Deploy", monai.deploy.__version__, "with", torch.__file__)'
