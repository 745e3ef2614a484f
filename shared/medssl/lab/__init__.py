"""medssl.lab: what a researcher runs on top of the library and the clinic.

``benchmark`` (the label-efficiency benchmark: dev split, trainings, evaluations; ``benchmark_plan`` its profiles,
methods and runs, ``benchmark_report`` its tables, paired comparisons and plots), ``speed``
(seconds per iteration and per scan), ``demo`` (the main job on the synthetic sample set), ``sample_data`` (that
synthetic set) and ``prepare_la`` (the public LA releases into the datalist layout).

Import rule: a lab module may import the library and ``medssl.clinic``; neither of them imports the lab.
``tests/test_layout.py`` checks it.
"""
