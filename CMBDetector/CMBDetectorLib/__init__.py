"""CMBDetector core library: cerebral microbleed detection on GRE/SWI MRI.

Knows nothing of Slicer or Qt. The Slicer module and the `cmbdetector` command line are thin
layers over it.
"""

__version__ = "0.1.0"
