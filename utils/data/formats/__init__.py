"""Readers of other annotation formats, for ``tools/convert_to_coco.py``.

Each reader (``voc.read_voc``, ``yolo.read_yolo``, ``csv_rows.read_csv``) turns its
format into :class:`~utils.data.formats.common.ImageEntry` records: one per image,
with its displayed size and its boxes as absolute ``x1, y1, x2, y2`` pixels, every
problem found reported with the file and line it comes from. ``common.to_coco`` makes
the COCO detection dict from them; the tool validates it with ``coco_dataset`` and
writes it.
"""
