"""Default settings for the two ways train.py is used: COCO (the paper) and the built-in demo.

Every option the user leaves at None takes the preset's value; anything given
on the command line wins. The demo preset is what lets a from-scratch detector
learn the synthetic shapes in minutes on a 2-core CPU (README: "Demo").
"""
import os

COCO_PRESET = dict(
    train_split="train2017", val_split="val2017", workers=4,
    backbone="resnet50", pretrained_backbone="DEFAULT", fpn_channels=256, num_extra_levels=2,
    anchor_base_sizes=[32, 64, 128, 256, 512], head_convs=4, head_norm="none", min_size=[800], max_size=1333,
    batch_size=16, optimizer="sgd", lr=None, weight_decay=1e-4, epochs=None, schedule="1x", lr_steps=None,
    warmup_iters=1000, eval_interval=4, output_dir="output/coco",
)

# Each choice is there to learn fast on 2 CPU cores from random init (README "Demo"):
# images trained at 128 px (the 160 px data resized: 1.56x fewer pixels), P3-P6 only
# with anchors 16..203 px (objects are 10-110 px at that size, so P7 would be 1x1),
# a 128-channel FPN with 2-conv GroupNorm heads (GN: batch statistics of 8 tiny images
# are noisy), batch 8 (more updates per image seen), AdamW with a cosine decay to 0 (the
# last epoch, at a small rate, adds most of the AP), and trainable BatchNorm in the trunk.
DEMO_PRESET = dict(
    data_path="data/demo", train_split="train", val_split="val", workers=0,
    backbone="resnet18", pretrained_backbone="none", fpn_channels=128, num_extra_levels=1,
    anchor_base_sizes=[16, 32, 64, 128], head_convs=2, head_norm="gn", min_size=[128], max_size=128,
    batch_size=8, optimizer="adamw", lr=2e-3, weight_decay=0.05, epochs=4, schedule="cosine", lr_steps=None,
    warmup_iters=200, eval_interval=0, output_dir="output/demo",
)
DEMO_DATASET = dict(num_train=3000, num_val=300, image_size=160, seed=0)

SCHEDULES = {"1x": (12, [8, 11]), "3x": (36, [27, 33])}


def apply_preset(args) -> None:
    """Fill unset options from the matching preset and derive ``args.model_kwargs``."""
    args.demo = args.data_path is None
    preset = DEMO_PRESET if args.demo else COCO_PRESET
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.demo:
        from utils.demo_data import ensure_demo_dataset
        from utils.distributed import barrier, is_main_process
        if is_main_process():
            ensure_demo_dataset(args.data_path, **DEMO_DATASET)
        barrier()
    default_epochs, default_steps = SCHEDULES.get(args.schedule, (12, [8, 11]))
    if args.epochs is None:
        args.epochs = default_epochs
    if args.lr_steps is None:
        args.lr_steps = default_steps if args.schedule in SCHEDULES else []
    if args.lr is None:  # linear scaling rule (Goyal et al. 2017) from the paper's 0.01 at batch 16
        args.lr = 0.01 * args.batch_size / 16 if args.optimizer == "sgd" else 1e-4 * args.batch_size / 16
    if str(args.pretrained_backbone).lower() == "none":
        args.pretrained_backbone = None
    args.bad_image_count = 0
    args.model_kwargs = dict(
        backbone=args.backbone, pretrained_backbone=args.pretrained_backbone,
        trainable_backbone_layers=args.trainable_backbone_layers, fpn_channels=args.fpn_channels,
        num_extra_levels=args.num_extra_levels, p6_from=args.p6_from, head_convs=args.head_convs,
        head_norm=None if args.head_norm == "none" else args.head_norm,
        anchor_base_sizes=list(args.anchor_base_sizes),
        min_size=args.min_size[0] if len(args.min_size) == 1 else list(args.min_size), max_size=args.max_size,
        box_loss=args.box_loss, channels_last=args.channels_last)
    args.output_dir = os.path.abspath(args.output_dir) if args.output_dir else args.output_dir
