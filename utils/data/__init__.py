"""The data pipeline: COCO annotation files (``coco_annotations``), image decoding (``image_io``),
augmentations (``transforms``), batch samplers and loaders (``samplers``, ``loaders``), the
synthetic demo dataset (``demo_data``) and readers of other formats (``formats/``)."""
