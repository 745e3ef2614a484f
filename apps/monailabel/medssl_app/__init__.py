"""The pieces of the medssl MONAI Label app (``apps/monailabel/main.py`` puts them together): :mod:`.refusals` (how a
refused request is answered), :mod:`.datastores` (a folder of NIfTI volumes, or a PACS over DICOMweb, with every
request checked and every write atomic) and :mod:`.tasks` (the bundles' inference and training as MONAI Label tasks).

MONAI Label imports ``main.py`` with the app folder on ``sys.path`` for that import only, so this package is imported
there, at the top, and its modules import each other at their tops too (a later import would not find it).
"""
