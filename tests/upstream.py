"""Third-party models as their authors wrote them: a helper module for the tests, not a test file.

Each class re-types a public upstream model in its structure (attribute and submodule names, layer
order, default settings, call style); a comment on each names its source and anything deliberately
different. Nothing here imports pureflax: these are the foreign models it has to take as they come.
"""

import math
from functools import partial
from typing import Any, Callable, Hashable, Sequence, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

ModuleDef = Any


# --- Flax Linen ------------------------------------------------------------------------------
# google/flax examples/mnist/train.py, class CNN (renamed). Input NHWC (N, 28, 28, 1).
class LinenCNN(nn.Module):
    """A simple CNN model."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # flatten (H, W, C order)
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


# google/flax examples/imagenet/models.py, ResNetBlock / ResNet / ResNet18 (the current "ResNetV1.5"
# form, whose norm partial carries axis_name='batch'). Input NHWC.
class ResNetBlock(nn.Module):
    """ResNet block."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: Tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNetV1.5."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, axis_name="batch")
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        x = jnp.asarray(x, self.dtype)
        return x


ResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock)


# Flax's ResNet above with torch's paddings, for torchvision's weights: every convolution pads
# (k - 1) // 2 on each side (3x3: 1, 1x1: 0, 7x7: 3) and the max pool ((1, 1), (1, 1)), where
# Linen's 'SAME' at stride 2 would pad (0, 1). Its layers and names are Flax's.
class TorchPaddedConv(nn.Conv):
    def __post_init__(self):
        if self.padding == "SAME":
            object.__setattr__(self, "padding", tuple(((k - 1) // 2,) * 2 for k in self.kernel_size))
        super().__post_init__()


class TorchPaddedResNet(ResNet):
    conv: ModuleDef = TorchPaddedConv

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(self.conv, use_bias=False, dtype=self.dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, axis_name="batch")
        x = nn.relu(norm(name="bn_init")(conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act)(x)
        return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2))), self.dtype)


TorchPaddedResNet18 = partial(TorchPaddedResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock)


# --- Equinox ---------------------------------------------------------------------------------
# patrick-kidger/equinox docs/examples/mnist.ipynb, class CNN: the docs' `layers` list and loop,
# but the Linen CNN's architecture (same function; ravel flattens C, H, W). One example (1, 28, 28).
class EqxCNN(eqx.Module):
    layers: list

    def __init__(self, key):
        key1, key2, key3, key4 = jax.random.split(key, 4)
        self.layers = [
            eqx.nn.Conv2d(1, 32, 3, padding=1, key=key1),
            jax.nn.relu,
            eqx.nn.AvgPool2d(2, 2),
            eqx.nn.Conv2d(32, 64, 3, padding=1, key=key2),
            jax.nn.relu,
            eqx.nn.AvgPool2d(2, 2),
            jnp.ravel,
            eqx.nn.Linear(3136, 256, key=key3),
            jax.nn.relu,
            eqx.nn.Linear(256, 10, key=key4),
        ]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# patrick-kidger/equinox docs/examples/mnist.ipynb, class CNN exactly as the docs have it.
class EqxDocsCNN(eqx.Module):
    layers: list

    def __init__(self, key):
        key1, key2, key3, key4 = jax.random.split(key, 4)
        # Standard CNN setup: convolutional layer, followed by flattening, with a small MLP on top.
        self.layers = [
            eqx.nn.Conv2d(1, 3, kernel_size=4, key=key1),
            eqx.nn.MaxPool2d(kernel_size=2),
            jax.nn.relu,
            jnp.ravel,
            eqx.nn.Linear(1728, 512, key=key2),
            jax.nn.sigmoid,
            eqx.nn.Linear(512, 64, key=key3),
            jax.nn.relu,
            eqx.nn.Linear(64, 10, key=key4),
            jax.nn.log_softmax,
        ]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# Artur-Galstyan/jaxonmodels jaxonmodels/layers/batch_norm.py, class BatchNorm (renamed): its own
# gamma/beta, running (mean, var) in one StateIndex, torch's momentum convention (new = (1 - m) *
# old + m * batch, unbiased running var), `inference` a field (eqx.nn.inference_mode flips it) or
# a call keyword. One example (C, ...) under jax.vmap(..., axis_name="batch"). Its separate 1-D
# and N-D branches are written as one here (same arithmetic).
class ZooBatchNorm(eqx.Module):
    state_index: eqx.nn.StateIndex
    gamma: jax.Array | None
    beta: jax.Array | None
    inference: bool
    axis_name: Hashable | Sequence[Hashable]
    size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    affine: bool = eqx.field(static=True)

    def __init__(self, size, axis_name, eps=1e-5, momentum=0.1, affine=True, inference=False):
        self.size, self.eps, self.momentum, self.affine = size, eps, momentum, affine
        self.inference, self.axis_name = inference, axis_name
        self.gamma = jnp.ones(size) if affine else None
        self.beta = jnp.zeros(size) if affine else None
        self.state_index = eqx.nn.StateIndex((jnp.zeros(size), jnp.ones(size)))

    def __call__(self, x, state, *, key=None, inference=None):
        if inference is None:
            inference = self.inference
        running_mean, running_var = state.get(self.state_index)
        shape = (-1,) + (1,) * (x.ndim - 1)
        axes = tuple(range(1, x.ndim))  # every axis but the channels
        if inference:
            xmu = x - running_mean.reshape(shape)
            x_hat = xmu / jnp.sqrt(running_var.reshape(shape) + self.eps)
        else:
            batch_mean = jax.lax.pmean(jnp.mean(x, axis=axes), axis_name=self.axis_name)
            batch_size = jax.lax.psum(1, axis_name=self.axis_name)
            xmu = x - batch_mean.reshape(shape)
            batch_var = jax.lax.pmean(jnp.mean(xmu**2, axis=axes), axis_name=self.axis_name)
            x_hat = xmu / jnp.sqrt(batch_var.reshape(shape) + self.eps)
            total = batch_size * math.prod(x.shape[1:])
            correction = total / jnp.maximum(total - 1, 1)
            running_mean = (1 - self.momentum) * running_mean + self.momentum * batch_mean
            running_var = (1 - self.momentum) * running_var + self.momentum * batch_var * correction
            state = state.set(self.state_index, (running_mean, running_var))
        out = x_hat
        if self.affine and self.gamma is not None and self.beta is not None:
            out = self.gamma.reshape(shape) * x_hat + self.beta.reshape(shape)
        return out, state


# Artur-Galstyan/jaxonmodels jaxonmodels/models/resnet.py (the version using layers/batch_norm.py):
# Downsample, BasicBlock, ResNet with BasicBlock and [2, 2, 2, 2] (renamed Zoo*; only the
# BasicBlock path of _make_layer; widths fixed at 64..512 as upstream has no width argument).
class ZooDownsample(eqx.Module):
    conv: eqx.nn.Conv2d
    bn: ZooBatchNorm

    def __init__(self, in_channels, out_channels, stride, key):
        _, subkey = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                  use_bias=False, key=subkey)
        self.bn = ZooBatchNorm(out_channels, axis_name="batch")

    def __call__(self, x, state):
        x = self.conv(x)
        x, state = self.bn(x, state)
        return x, state


class ZooBasicBlock(eqx.Module):
    downsample: ZooDownsample | None
    conv1: eqx.nn.Conv2d
    bn1: ZooBatchNorm
    conv2: eqx.nn.Conv2d
    bn2: ZooBatchNorm
    expansion: int = eqx.field(static=True, default=1)

    def __init__(self, in_channels, out_channels, stride, downsample, key):
        key, *subkeys = jax.random.split(key, 3)
        conv = partial(eqx.nn.Conv2d, kernel_size=3, padding=1, use_bias=False)
        self.conv1 = conv(in_channels, out_channels, stride=stride, key=subkeys[0])
        self.bn1 = ZooBatchNorm(size=out_channels, axis_name="batch")
        self.conv2 = conv(out_channels, out_channels, stride=1, key=subkeys[1])
        self.bn2 = ZooBatchNorm(size=out_channels, axis_name="batch")
        self.downsample = downsample

    def __call__(self, x, state):
        i = x
        x = self.conv1(x)
        x, state = self.bn1(x, state)
        x = jax.nn.relu(x)
        x = self.conv2(x)
        x, state = self.bn2(x, state)
        if self.downsample:
            i, state = self.downsample(i, state)
        x += i
        x = jax.nn.relu(x)
        return x, state


class ZooResNet18(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn: ZooBatchNorm
    mp: eqx.nn.MaxPool2d
    layer1: list[ZooBasicBlock]
    layer2: list[ZooBasicBlock]
    layer3: list[ZooBasicBlock]
    layer4: list[ZooBasicBlock]
    avg: eqx.nn.AdaptiveAvgPool2d
    fc: eqx.nn.Linear
    running_internal_channels: int = eqx.field(static=True, default=64)

    def __init__(self, n_classes=1000, *, key, input_channels=3):
        key, *subkeys = jax.random.split(key, 10)
        self.conv1 = eqx.nn.Conv2d(input_channels, self.running_internal_channels, kernel_size=7,
                                   stride=2, padding=3, use_bias=False, key=subkeys[0])
        self.bn = ZooBatchNorm(self.running_internal_channels, axis_name="batch")
        self.mp = eqx.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2, stride=1, key=subkeys[1])
        self.layer2 = self._make_layer(128, 2, stride=2, key=subkeys[2])
        self.layer3 = self._make_layer(256, 2, stride=2, key=subkeys[3])
        self.layer4 = self._make_layer(512, 2, stride=2, key=subkeys[4])
        self.avg = eqx.nn.AdaptiveAvgPool2d(target_shape=(1, 1))
        self.fc = eqx.nn.Linear(512 * ZooBasicBlock.expansion, n_classes, key=subkeys[-1])

    def _make_layer(self, out_channels, blocks, stride, key):
        downsample = None
        channels = self.running_internal_channels
        if stride != 1 or channels != out_channels * ZooBasicBlock.expansion:
            key, subkey = jax.random.split(key)
            downsample = ZooDownsample(channels, out_channels, stride, subkey)
        key, subkey = jax.random.split(key)
        layers = [ZooBasicBlock(channels, out_channels, stride, downsample, subkey)]
        self.running_internal_channels = out_channels * ZooBasicBlock.expansion
        for _ in range(1, blocks):
            key, subkey = jax.random.split(key)
            layers.append(ZooBasicBlock(out_channels, out_channels, 1, None, subkey))
        return layers

    def __call__(self, x, state):
        x = self.conv1(x)
        x, state = self.bn(x, state)
        x = jax.nn.relu(x)
        x = self.mp(x)
        for layer in self.layer1:
            x, state = layer(x, state)
        for layer in self.layer2:
            x, state = layer(x, state)
        for layer in self.layer3:
            x, state = layer(x, state)
        for layer in self.layer4:
            x, state = layer(x, state)
        x = self.avg(x)
        x = jnp.ravel(x)
        x = self.fc(x)
        return x, state


def zoo_resnet18(key, n_classes=1000):
    """Upstream's ``resnet18`` factory: ``(model, state)``."""
    return eqx.nn.make_with_state(ZooResNet18)(n_classes, key=key)


# Not upstream: the smallest model around ZooBatchNorm (Conv2d -> BN -> relu -> mean over H, W ->
# Linear), in the zoo's call style, for cheap tests. One example (C, H, W).
class ZooSmall(eqx.Module):
    conv: eqx.nn.Conv2d
    bn: ZooBatchNorm
    fc: eqx.nn.Linear

    def __init__(self, in_channels=1, channels=8, n_classes=10, *, key):
        key1, key2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, key=key1)
        self.bn = ZooBatchNorm(channels, axis_name="batch")
        self.fc = eqx.nn.Linear(channels, n_classes, key=key2)

    def __call__(self, x, state):
        x = self.conv(x)
        x, state = self.bn(x, state)
        x = jax.nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x), state


# --- Flax NNX --------------------------------------------------------------------------------
# google/flax docs_nnx/mnist_tutorial.md, class CNN (renamed). Input NHWC (N, 28, 28, 1).
class NNXCNN(nnx.Module):
    """A simple CNN model."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.conv1(x)))
        x = self.avg_pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.linear1(x))
        x = self.linear2(x)
        return x


# torchvision's resnet18 (torchvision/models/resnet.py names: conv1, bn1, maxpool, layer1..layer4,
# fc; BasicBlock conv1, bn1, conv2, bn2, downsample) ported in the style of google/flax
# docs_nnx/migrating/pytorch_to_jax_flax.rst ("From PyTorch to Jax and Flax", its ResNet50 port):
# blocks in an nnx.List, downsample as torch's Sequential (nnx.Sequential(conv 1x1, bn)), pools as
# functions. padding="torch": torchvision's (3x3 1, 1x1 0, conv1 3, max pool ((1, 1), (1, 1)) as the
# guide writes it); padding="flax": the Linen ResNet18's ('SAME', conv1 ((3, 3), (3, 3)), max pool
# 'SAME'), the same function as ResNet18 above. BatchNorm momentum 0.9 (torch's 0.1, per the guide)
# and eps 1e-5, training mode until model.eval(). Added for sizes: num_filters, in_channels. NHWC.
_PADDINGS = {
    "torch": {"conv3": 1, "conv1x1": 0, "stem": 3, "pool": ((1, 1), (1, 1))},
    "flax": {"conv3": "SAME", "conv1x1": "SAME", "stem": ((3, 3), (3, 3)), "pool": "SAME"},
}


def _norm(planes, rngs):
    return nnx.BatchNorm(planes, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, *, padding="flax", rngs):
        conv = partial(nnx.Conv, kernel_size=(3, 3), padding=_PADDINGS[padding]["conv3"],
                       use_bias=False, rngs=rngs)
        self.conv1 = conv(inplanes, planes, strides=stride)
        self.bn1 = _norm(planes, rngs)
        self.conv2 = conv(planes, planes, strides=1)
        self.bn2 = _norm(planes, rngs)
        self.downsample = downsample

    def __call__(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = nnx.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return nnx.relu(out)


class NNXResNet18(nnx.Module):
    def __init__(self, num_classes=1000, *, num_filters=64, padding="flax", in_channels=3, rngs):
        pads = _PADDINGS[padding]
        self.padding = padding
        self.inplanes = num_filters
        self.conv1 = nnx.Conv(in_channels, num_filters, (7, 7), strides=2, padding=pads["stem"],
                              use_bias=False, rngs=rngs)
        self.bn1 = _norm(num_filters, rngs)
        self.maxpool = partial(nnx.max_pool, window_shape=(3, 3), strides=(2, 2),
                               padding=pads["pool"])
        self.layer1 = self._make_layer(num_filters, 2, rngs=rngs)
        self.layer2 = self._make_layer(num_filters * 2, 2, stride=2, rngs=rngs)
        self.layer3 = self._make_layer(num_filters * 4, 2, stride=2, rngs=rngs)
        self.layer4 = self._make_layer(num_filters * 8, 2, stride=2, rngs=rngs)
        self.fc = nnx.Linear(num_filters * 8 * BasicBlock.expansion, num_classes, rngs=rngs)

    def _make_layer(self, planes, blocks, stride=1, *, rngs):
        block = partial(BasicBlock, padding=self.padding, rngs=rngs)
        width = planes * BasicBlock.expansion
        downsample = None
        if stride != 1 or self.inplanes != width:
            pad = _PADDINGS[self.padding]["conv1x1"]
            downsample = nnx.Sequential(
                nnx.Conv(self.inplanes, width, (1, 1), strides=stride, padding=pad, use_bias=False,
                         rngs=rngs),
                _norm(width, rngs),
            )
        layers = nnx.List([block(self.inplanes, planes, stride, downsample)])
        self.inplanes = width
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return layers

    def __call__(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = nnx.relu(x)
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
        x = nnx.avg_pool(x, (x.shape[1], x.shape[2]))  # torch's AdaptiveAvgPool2d(1), in NHWC
        x = x.reshape((x.shape[0], -1))
        return self.fc(x)
