"""The data pipeline: COCO annotation files (``coco_annotations``), image decoding (``image_io``),
augmentations (``transforms``), batch samplers and loaders (``samplers``, ``loaders``), the
synthetic demo dataset (``demo_data``, drawn by ``demo_shapes``), readers of other formats (``formats/``) and the input
files and output names of an inference run (``inputs``)."""
