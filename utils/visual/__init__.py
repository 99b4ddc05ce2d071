"""Pictures and video: drawing detections (``visualize``), decoding and encoding video
(``video``), training curves (``training_curves``) and the one matplotlib import (``plotting``)."""
