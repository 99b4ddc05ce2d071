"""Library code below the model, grouped by concern; each folder says what belongs in it.

- ``boxes/``: box maths the model and its loss both use (IoU, encoding, matching). Pure functions.
- ``data/``: reading annotations and images, transforms, samplers, loaders, the demo dataset,
  and the converters from other dataset formats.
- ``evaluation/``: COCO scoring, results files, precision/recall plots.
- ``visual/``: drawing detections, video decoding/encoding, training curves, matplotlib access.
- ``runtime/``: process plumbing every script shares: errors, devices and autocast, distributed,
  logging, atomic writes, checkpoints files, seeds, weight downloads, the help formatter.
- ``training/``: pieces of a training run that are not the loop itself: the optimizer and the
  learning-rate schedule, the AMP self-check, stop requests on signals.

Nothing here imports ``model/``, ``losses/``, ``ops/``, ``deploy/`` or an entry script.
"""
