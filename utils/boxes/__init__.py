"""Box maths shared by the model and its loss: IoU and conversions (``box_ops``), the box
coder (``box_coder``), anchor-to-ground-truth matching (``matcher``). Pure tensor functions."""
