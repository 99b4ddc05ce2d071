from .box_losses import giou_loss, smooth_l1_loss
from .focal_loss import sigmoid_focal_loss

__all__ = ["sigmoid_focal_loss", "smooth_l1_loss", "giou_loss"]
