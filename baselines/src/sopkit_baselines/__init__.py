"""The paper's non-SOP baselines, shipped as a sopkit plugin.

Strategies, registered only through the ``sopkit.strategies`` entry-point group of this
distribution's pyproject.toml (importing this package registers nothing, and sopkit never imports
it):

* ``ensemble`` (:mod:`sopkit_baselines.ensemble`): ENSEMBLE-BASELINE, ``e`` independently seeded
  baselines with averaged probabilities; ``e`` times the inference parameters.
* ``distill`` (:mod:`sopkit_baselines.distill`): DISTILLED-BASELINE, the baseline architecture
  trained with Hinton's KD loss from that ensemble.
* ``subset`` (:mod:`sopkit_baselines.subset`, :mod:`sopkit_baselines.subnetwork`,
  :mod:`sopkit_baselines.submodular`):
  SUBSET-BASELINE, Appendix D's per-step submodular neuron selection, for MLPs.
* ``soup`` and ``soup-greedy`` (:mod:`sopkit_baselines.soup`): MODEL SOUPS (Appendix C, Table 5),
  ``e`` fine-tunings from one start with their weights averaged, uniformly or greedily.
"""
