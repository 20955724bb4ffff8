"""The quality-speed frontier (issue 13): every method and setting a user could pick to speed up SDXL.

* ``settings``: the settings by name, and how each is put on (and taken off) a diffusers UNet;
* ``speed``: their measured speed-up on the real SDXL-base architecture on this CPU;
* ``benchmarks.fidelity.frontier``: their fidelity to the unpruned samples on the trained small models;
* ``report``: both together, as one plot per model and the table of best picks per target speed-up.
"""
