"""Water corpora at scale: conditions sampled per trajectory (temperature, density, box size, water model,
periodic box or cluster), one OpenMM trajectory per task (Ray, in-process or on a cluster), one extxyz per
trajectory written atomically, so a killed generation finishes only the missing trajectories."""
