"""medssl.clinic: what a hospital runs on top of the library.

``segment`` (NIfTI and DICOM in, label maps, statistics and DICOM SEG out), ``dicom`` (series reader, SEG and MR series
writers), ``dicom_node`` (a DICOM Storage SCP that segments what it receives) with ``series_queue`` (its series on disk,
the worker and the sweeper) and ``dicom_send`` (C-STORE of the SEGs), ``label`` (the MONAI Label datastore/infer
pieces), ``runtime_choice`` (``--runtime auto``) and ``release`` (packaging and pulling verified bundles).

Import rule: a clinic module may import the library (``medssl.<module>``) and other clinic modules; never
``medssl.lab`` and never the command line (``medssl.cli``). The library never imports the clinic.
``tests/test_layout.py`` checks it.
"""
