"""Physics-based simulation of GRE/SWI brain scans with microbleeds and their mimics.

anatomy.py      MNI152 2009 templates (from the nilearn wheel) and a head model around them
deform.py       per-scan random affine + smooth elastic deformation, both directions
physics.py      dipole field, GRE signal, intravoxel dephasing, SWI processing
structures.py   veins, iron-rich nuclei, calcifications, air-bone sources, microbleeds
acquisition.py  the protocols (3 T SWI, 3 T 3D GRE, 1.5 T 2D GRE) and their random variation
synth.py        one scan end to end, the files it writes, and the `cmbdetector synth` command
preview.py      the gallery PNG
"""
