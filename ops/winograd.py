"""3x3 stride-1 convolutions with Winograd's minimal filtering F(2x2, 3x3) on CPU.

Each 2x2 block of outputs is computed from a 4x4 input tile with 16 multiplications
per (input, output) channel pair instead of 36 (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016): the transformed tiles of all images and
positions meet the transformed filters in 16 batched matrix products, which run at
the BLAS's full speed. Backward uses the same transforms (the gradients of a
Winograd convolution are Winograd convolutions), so all three products of a
training step shrink by the same 2.25x in multiplications; the transforms
themselves are additions and subtractions only.

PyTorch's eager CPU convs run oneDNN's direct algorithm (its fp32 Winograd kernels
need AVX-512 and are not selected), and a RetinaNet head of 3x3 convs over P3 is most
of a training step: this makes it cheaper. The size thresholds below were measured
on a 2-core AVX2 CPU; on other CPUs compare with ``model.optimize_for("cpu", winograd=False)``.
Transforms use exact coefficients (0, +-1, +-1/2), so results match ``F.conv2d`` to
float rounding (tested against it in float64 and float32).
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Filter transform G (4 x 3): the only matrix with non-integer entries.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_applicable(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``conv(x)`` may take the Winograd path: a plain 3x3 / stride 1 / padding 1 conv
    on a float32 CPU tensor (not under autocast) big enough for the batched products to pay off."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= _MIN_CHANNELS
            and x.shape[-1] * x.shape[-2] >= _MIN_PIXELS)


# Measured on a 2-core AVX2 CPU (benchmarks/README.md): below 256 channels or 32 x 32
# pixels the per-op overhead of the transforms outweighs the saved multiplications.
_MIN_CHANNELS = 256
_MIN_PIXELS = 32 * 32


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, padding 1) that takes the Winograd path where it is faster.

    Made from an existing conv by :func:`use_winograd`, sharing its parameters: the
    state dict, the optimizer's parameter list and the initialisation stay those of the
    plain conv. ``winograd = False`` turns the fast path off (equivalence tests).
    """

    winograd = True

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "WinogradConv2d":
        new = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None,
                  device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.winograd and winograd_applicable(x, self):
            return conv3x3_winograd(x, self.weight, self.bias)
        return super().forward(x)


def winograd_candidate(conv: nn.Module) -> bool:
    """A plain 3x3 / stride 1 / padding 1 conv wide enough for Winograd to pay off on CPU."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= _MIN_CHANNELS)


def use_winograd(module: nn.Module) -> int:
    """Replace every :func:`winograd_candidate` conv inside ``module`` by a :class:`WinogradConv2d`
    sharing its parameters; returns how many were replaced. Whether the fast path runs is
    decided per call (:func:`winograd_applicable`): on GPU, under autocast or torch.compile
    and on small maps the plain conv runs."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if winograd_candidate(child):
                setattr(parent, name, WinogradConv2d.from_conv(child))
                replaced += 1
    return replaced


def conv3x3_winograd(x: Tensor, weight: Tensor, bias: Tensor = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``x [N, C, H, W]``, ``weight [K, C, 3, 3]``."""
    return _Conv3x3Winograd.apply(x, weight, bias)


# Tiles per step: the transformed tiles of one band of one image ([16, C, T] floats,
# 4 MB for C = 256) stay in the CPU cache between the transforms and the product.
_TILES_PER_STEP = 256


def _bands(batch: int, tiles_h: int, tiles_w: int):
    """(image, first tile row, tile rows) steps covering every tile once."""
    rows = max(1, _TILES_PER_STEP // tiles_w)
    for image in range(batch):
        for start in range(0, tiles_h, rows):
            yield image, start, min(rows, tiles_h - start)


def _tiles(band: Tensor, tile_rows: int, tiles_w: int) -> Tensor:
    """Padded input rows ``[C, 2 * tile_rows + 2, 2 * tiles_w + 2]`` -> ``V [16, C, tile_rows * tiles_w]``:
    ``B^T d B`` of each 4x4 tile at stride 2."""
    channels = band.shape[0]
    rows = [band[:, j:j + 2 * tile_rows:2] for j in range(4)]  # [C, tr, Wp] each
    # B^T = (d0 - d2, d1 + d2, d2 - d1, d1 - d3), first along the rows, then the columns.
    out = band.new_empty(4, 4, channels, tile_rows, tiles_w)
    for a, row in enumerate((rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3])):
        cols = [row[:, :, j:j + 2 * tiles_w:2] for j in range(4)]  # [C, tr, tw] each
        torch.sub(cols[0], cols[2], out=out[a, 0])
        torch.add(cols[1], cols[2], out=out[a, 1])
        torch.sub(cols[2], cols[1], out=out[a, 2])
        torch.sub(cols[1], cols[3], out=out[a, 3])
    return out.view(16, channels, tile_rows * tiles_w)


def _add_tiles_adjoint(grad_v: Tensor, target: Tensor, tile_rows: int, tiles_w: int) -> None:
    """Adjoint of ``_tiles``: adds the input gradient of ``grad_v [16, C, T]`` into the padded
    rows ``target [C, 2 * tile_rows + 2, 2 * tiles_w + 2]`` (overlapping tiles add up)."""
    channels = grad_v.shape[1]
    g = grad_v.view(4, 4, channels, tile_rows, tiles_w)

    def adjoint(v0, v1, v2, v3):  # the transpose of B^T along one axis
        return v0, v1 - v2 + v3, v1 + v2 - v0, -v3

    target = target.view(channels, tile_rows + 1, 2, tiles_w + 1, 2)
    by_column = [adjoint(*g[a].unbind(0)) for a in range(4)]  # [a][jj]: [C, tr, tw]
    for jj in range(4):
        for ii, value in enumerate(adjoint(*(by_column[a][jj] for a in range(4)))):
            # Tile (i, j), element (ii, jj) is padded pixel (2i + ii, 2j + jj).
            target[:, ii // 2:ii // 2 + tile_rows, ii % 2, jj // 2:jj // 2 + tiles_w, jj % 2] += value


def _untile(m: Tensor, target: Tensor, tile_rows: int, tiles_w: int) -> None:
    """``M [16, K, T]`` -> ``target [K, 2 * tile_rows, 2 * tiles_w]``: ``A^T m A``, 2x2 outputs a tile."""
    channels = m.shape[1]
    m = m.view(4, 4, channels, tile_rows, tiles_w)
    target = target.view(channels, tile_rows, 2, tiles_w, 2)
    # A^T = (m0 + m1 + m2, m1 - m2 - m3), along the rows, then the columns.
    for p, row in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):
        torch.add(row[0] + row[1], row[2], out=target[:, :, p, :, 0])
        torch.sub(row[1] - row[2], row[3], out=target[:, :, p, :, 1])


def _untile_adjoint(grad: Tensor, tile_rows: int, tiles_w: int) -> Tensor:
    """Adjoint of ``_untile``: ``[K, 2 * tile_rows, 2 * tiles_w]`` -> ``[16, K, T]``."""
    channels = grad.shape[0]
    g = grad.view(channels, tile_rows, 2, tiles_w, 2)
    out = grad.new_empty(4, 4, channels, tile_rows, tiles_w)
    g0, g1 = g[:, :, 0], g[:, :, 1]  # output rows p = 0, 1: [K, tr, tw, 2 (q)]
    # The transpose of A^T along one axis: (g0, g0 + g1, g0 - g1, -g1).
    for a, row in enumerate((g0, g0 + g1, g0 - g1, -g1)):
        q0, q1 = row[..., 0], row[..., 1]
        out[a, 0].copy_(q0)
        torch.add(q0, q1, out=out[a, 1])
        torch.sub(q0, q1, out=out[a, 2])
        torch.neg(q1, out=out[a, 3])
    return out.view(16, channels, tile_rows * tiles_w)


def _filter_transform(weight: Tensor) -> Tensor:
    """``[K, C, 3, 3]`` -> ``U [16, K, C]``: ``G g G^T`` for every filter."""
    g = weight.new_tensor(_G)
    return torch.einsum("ai,kcij,bj->abkc", g, weight, g).reshape(16, weight.shape[0], weight.shape[1])


def _padded(x: Tensor, tiles_h: int, tiles_w: int) -> Tensor:
    """The conv's 1 px of zeros on top / left, and enough at the bottom / right for whole tiles."""
    height, width = x.shape[-2:]
    return F.pad(x, (1, 2 * tiles_w + 1 - width, 1, 2 * tiles_h + 1 - height))


class _Conv3x3Winograd(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias):
        x, weight = x.contiguous(), weight.contiguous()
        batch, _, height, width = x.shape
        tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
        xp = _padded(x, tiles_h, tiles_w)
        u = _filter_transform(weight)  # [16, K, C]
        out = x.new_empty(batch, weight.shape[0], 2 * tiles_h, 2 * tiles_w)
        for image, start, rows in _bands(batch, tiles_h, tiles_w):
            v = _tiles(xp[image, :, 2 * start:2 * (start + rows) + 2], rows, tiles_w)
            _untile(torch.bmm(u, v), out[image, :, 2 * start:2 * (start + rows)], rows, tiles_w)
        if 2 * tiles_h != height or 2 * tiles_w != width:
            out = out[:, :, :height, :width].contiguous()
        if bias is not None:
            out += bias.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        batch, channels, height, width = x.shape
        tiles_h, tiles_w = (height + 1) // 2, (width + 1) // 2
        grad_out = F.pad(grad_out, (0, 2 * tiles_w - width, 0, 2 * tiles_h - height))
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_w = grad_b = None
        u_t = _filter_transform(weight).transpose(1, 2) if need_x else None  # [16, C, K]
        xp = _padded(x, tiles_h, tiles_w) if need_w else None
        grad_xp = x.new_zeros(batch, channels, 2 * tiles_h + 2, 2 * tiles_w + 2) if need_x else None
        grad_u = x.new_zeros(16, weight.shape[0], channels) if need_w else None
        for image, start, rows in _bands(batch, tiles_h, tiles_w):
            grad_m = _untile_adjoint(grad_out[image, :, 2 * start:2 * (start + rows)], rows, tiles_w)
            band = slice(2 * start, 2 * (start + rows) + 2)
            if need_x:
                _add_tiles_adjoint(torch.bmm(u_t, grad_m), grad_xp[image, :, band], rows, tiles_w)
            if need_w:
                # The transformed input is recomputed rather than saved: it is 4x the input's size.
                grad_u.baddbmm_(grad_m, _tiles(xp[image, :, band], rows, tiles_w).transpose(1, 2))
        if need_x:
            grad_x = grad_xp[:, :, 1:height + 1, 1:width + 1]
        if need_w:
            g = weight.new_tensor(_G)
            grad_w = torch.einsum("ai,abkc,bj->kcij", g, grad_u.view(4, 4, *grad_u.shape[1:]), g)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b
