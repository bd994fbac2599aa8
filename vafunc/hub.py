"""Published pretrained weights: the table of checkpoints, loading and saving checkpoint files.

* :func:`list_weights` / :func:`get_weights`: the published ImageNet-1k checkpoints as facts
  (:class:`Weights`): file name and URL (the hash prefix is part of the file name), the evaluation
  transform, reported accuracy and GFLOPs. Every torchvision classification checkpoint, timm's
  ``legacy_xception.tf_in1k`` (vafunc ``xception``) and ``mobilenetv1_100.ra4_e3600_r224_in1k``
  (vafunc ``mobilenet_v1``), and Cadene's BN-Inception (vafunc ``inception_v2``).
* :func:`load_weights` ``(model, "IMAGENET1K_V2" | "DEFAULT" | path) -> (params, state)``: a tag
  resolves to the torch.hub cache file (``$TORCH_HOME/hub/checkpoints/<file>``), downloaded with
  hash checking when it is missing (never at import); a path reads ``.pth``/``.pt`` with
  ``torch.load(weights_only=True)`` or ``.safetensors``. Loading is strict and all-or-nothing.
* :func:`save_weights` writes ``.safetensors`` or ``.pth`` atomically.
* :func:`pretrained` ``(name, tag) -> (model, params, state)`` builds the model with the config the
  checkpoint needs (e.g. torchvision's Inception-v3 weights expect ``transform_input=True``).

Every problem raises :class:`WeightsError` (a ``ValueError``) that names the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from . import registry
from . import tree as vtree
from .imagenet_classes import IMAGENET_CATEGORIES
from .weights import StateDictMismatch, from_state_dict

__all__ = [
    "Weights",
    "WeightsError",
    "list_weights",
    "get_weights",
    "find_weights",
    "load_weights",
    "save_weights",
    "read_checkpoint",
    "pretrained",
    "cache_dir",
    "identify",
    "verify_hash",
]

SAFETENSORS_HINT = "pip install 'vafunc[safetensors]'"


class WeightsError(ValueError):
    """A checkpoint cannot be found, read or used; the message names the file and the reason."""


# --------------------------------------------------------------------------- the table

#: Evaluation normalisations: (mean, std, channel order, pixel scale before normalising).
NORMALIZATIONS = {
    # torchvision: RGB in [0, 1], ImageNet mean/std
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "RGB", 1.0),
    # TF-trained ports (timm, torchvision's EfficientNetV2-L): RGB in [-1, 1]
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "RGB", 1.0),
    # torchvision's VGG16 IMAGENET1K_FEATURES (amdegroot's SSD port): mean-subtracted 0-255 RGB
    "vgg_features": ((0.48235, 0.45882, 0.40784), (1 / 255, 1 / 255, 1 / 255), "RGB", 1.0),
    # Caffe (Cadene's BN-Inception): BGR in 0-255 minus the per-channel mean, std 1
    "caffe_bgr": ((104.0, 117.0, 128.0), (1.0, 1.0, 1.0), "BGR", 255.0),
}

_TORCHVISION_URL = "https://download.pytorch.org/models/"

# Every torchvision classification checkpoint (torchvision 0.29 ``Weights`` enums; the reference
# facts in shared/reference/torchvision_weights.csv). Columns: model, tag, default (*), file
# (under https://download.pytorch.org/models/), parameters, GFLOPs (multiply-adds, torchvision's
# ``_ops``), acc@1, acc@5 (ImageNet-1k val, '-' = not published), resize, crop, interpolation,
# normalisation (NORMALIZATIONS), config the checkpoint needs ('-' = none; torchvision's builders
# set these when given the weights).
_TORCHVISION_TABLE = """
alexnet            IMAGENET1K_V1             * alexnet-owt-7be5be79.pth               61100840  0.714    56.522 79.066 256 224 bilinear imagenet     -
convnext_base      IMAGENET1K_V1             * convnext_base-6075fbad.pth             88591464  15.355   84.062 96.87  232 224 bilinear imagenet     -
convnext_large     IMAGENET1K_V1             * convnext_large-ea097f82.pth            197767336 34.361   84.414 96.976 232 224 bilinear imagenet     -
convnext_small     IMAGENET1K_V1             * convnext_small-0c510722.pth            50223688  8.684    83.616 96.65  230 224 bilinear imagenet     -
convnext_tiny      IMAGENET1K_V1             * convnext_tiny-983f1562.pth             28589128  4.456    82.52  96.146 236 224 bilinear imagenet     -
densenet121        IMAGENET1K_V1             * densenet121-a639ec97.pth               7978856   2.834    74.434 91.972 256 224 bilinear imagenet     -
densenet161        IMAGENET1K_V1             * densenet161-8d451a50.pth               28681000  7.728    77.138 93.56  256 224 bilinear imagenet     -
densenet169        IMAGENET1K_V1             * densenet169-b2777c0a.pth               14149480  3.36     75.6   92.806 256 224 bilinear imagenet     -
densenet201        IMAGENET1K_V1             * densenet201-c1103571.pth               20013928  4.291    76.896 93.37  256 224 bilinear imagenet     -
efficientnet_b0    IMAGENET1K_V1             * efficientnet_b0_rwightman-7f5810bc.pth 5288548   0.386    77.692 93.532 256 224 bicubic  imagenet     -
efficientnet_b1    IMAGENET1K_V1             - efficientnet_b1_rwightman-bac287d4.pth 7794184   0.687    78.642 94.186 256 240 bicubic  imagenet     -
efficientnet_b1    IMAGENET1K_V2             * efficientnet_b1-c27df63c.pth           7794184   0.687    79.838 94.934 255 240 bilinear imagenet     -
efficientnet_b2    IMAGENET1K_V1             * efficientnet_b2_rwightman-c35c1473.pth 9109994   1.088    80.608 95.31  288 288 bicubic  imagenet     -
efficientnet_b3    IMAGENET1K_V1             * efficientnet_b3_rwightman-b3899882.pth 12233232  1.827    82.008 96.054 320 300 bicubic  imagenet     -
efficientnet_b4    IMAGENET1K_V1             * efficientnet_b4_rwightman-23ab8bcd.pth 19341616  4.394    83.384 96.594 384 380 bicubic  imagenet     -
efficientnet_b5    IMAGENET1K_V1             * efficientnet_b5_lukemelas-1a07897c.pth 30389784  10.266   83.444 96.628 456 456 bicubic  imagenet     -
efficientnet_b6    IMAGENET1K_V1             * efficientnet_b6_lukemelas-24a108a5.pth 43040704  19.068   84.008 96.916 528 528 bicubic  imagenet     -
efficientnet_b7    IMAGENET1K_V1             * efficientnet_b7_lukemelas-c5b4e57e.pth 66347960  37.746   84.122 96.908 600 600 bicubic  imagenet     -
efficientnet_v2_l  IMAGENET1K_V1             * efficientnet_v2_l-59c71312.pth         118515272 56.08    85.808 97.788 480 480 bicubic  inception    -
efficientnet_v2_m  IMAGENET1K_V1             * efficientnet_v2_m-dc08266a.pth         54139356  24.582   85.112 97.156 480 480 bilinear imagenet     -
efficientnet_v2_s  IMAGENET1K_V1             * efficientnet_v2_s-dd5fe13b.pth         21458488  8.366    84.228 96.878 384 384 bilinear imagenet     -
googlenet          IMAGENET1K_V1             * googlenet-1378be20.pth                 6624904   1.498    69.778 89.53  256 224 bilinear imagenet     transform_input=True,aux_logits=False
inception_v3       IMAGENET1K_V1             * inception_v3_google-0cc3c7bd.pth       27161264  5.713    77.294 93.45  342 299 bilinear imagenet     transform_input=True
maxvit_t           IMAGENET1K_V1             * maxvit_t-bc5ab103.pth                  30919624  5.558    83.7   96.722 224 224 bicubic  imagenet     -
mnasnet0_5         IMAGENET1K_V1             * mnasnet0.5_top1_67.823-3ffadce67e.pth  2218512   0.104    67.734 87.49  256 224 bilinear imagenet     -
mnasnet0_75        IMAGENET1K_V1             * mnasnet0_75-7090bc5f.pth               3170208   0.215    71.18  90.496 232 224 bilinear imagenet     -
mnasnet1_0         IMAGENET1K_V1             * mnasnet1.0_top1_73.512-f206786ef8.pth  4383312   0.314    73.456 91.51  256 224 bilinear imagenet     -
mnasnet1_3         IMAGENET1K_V1             * mnasnet1_3-a4c69d6f.pth                6282256   0.526    76.506 93.522 232 224 bilinear imagenet     -
mobilenet_v2       IMAGENET1K_V1             - mobilenet_v2-b0353104.pth              3504872   0.301    71.878 90.286 256 224 bilinear imagenet     -
mobilenet_v2       IMAGENET1K_V2             * mobilenet_v2-7ebf99e0.pth              3504872   0.301    72.154 90.822 232 224 bilinear imagenet     -
mobilenet_v3_large IMAGENET1K_V1             - mobilenet_v3_large-8738ca79.pth        5483032   0.217    74.042 91.34  256 224 bilinear imagenet     -
mobilenet_v3_large IMAGENET1K_V2             * mobilenet_v3_large-5c1a4163.pth        5483032   0.217    75.274 92.566 232 224 bilinear imagenet     -
mobilenet_v3_small IMAGENET1K_V1             * mobilenet_v3_small-047dcff4.pth        2542856   0.057    67.668 87.402 256 224 bilinear imagenet     -
regnet_x_16gf      IMAGENET1K_V1             - regnet_x_16gf-2007eb11.pth             54278536  15.941   80.058 94.944 256 224 bilinear imagenet     -
regnet_x_16gf      IMAGENET1K_V2             * regnet_x_16gf-ba3796d7.pth             54278536  15.941   82.716 96.196 232 224 bilinear imagenet     -
regnet_x_1_6gf     IMAGENET1K_V1             - regnet_x_1_6gf-e3633e7f.pth            9190136   1.603    77.04  93.44  256 224 bilinear imagenet     -
regnet_x_1_6gf     IMAGENET1K_V2             * regnet_x_1_6gf-a12f2b72.pth            9190136   1.603    79.668 94.922 232 224 bilinear imagenet     -
regnet_x_32gf      IMAGENET1K_V1             - regnet_x_32gf-9d47f8d0.pth             107811560 31.736   80.622 95.248 256 224 bilinear imagenet     -
regnet_x_32gf      IMAGENET1K_V2             * regnet_x_32gf-6eb8fdc6.pth             107811560 31.736   83.014 96.288 232 224 bilinear imagenet     -
regnet_x_3_2gf     IMAGENET1K_V1             - regnet_x_3_2gf-f342aeae.pth            15296552  3.177    78.364 93.992 256 224 bilinear imagenet     -
regnet_x_3_2gf     IMAGENET1K_V2             * regnet_x_3_2gf-7071aa85.pth            15296552  3.177    81.196 95.43  232 224 bilinear imagenet     -
regnet_x_400mf     IMAGENET1K_V1             - regnet_x_400mf-adf1edd5.pth            5495976   0.414    72.834 90.95  256 224 bilinear imagenet     -
regnet_x_400mf     IMAGENET1K_V2             * regnet_x_400mf-62229a5f.pth            5495976   0.414    74.864 92.322 232 224 bilinear imagenet     -
regnet_x_800mf     IMAGENET1K_V1             - regnet_x_800mf-ad17e45c.pth            7259656   0.8      75.212 92.348 256 224 bilinear imagenet     -
regnet_x_800mf     IMAGENET1K_V2             * regnet_x_800mf-94a99ebd.pth            7259656   0.8      77.522 93.826 232 224 bilinear imagenet     -
regnet_x_8gf       IMAGENET1K_V1             - regnet_x_8gf-03ceed89.pth              39572648  7.995    79.344 94.686 256 224 bilinear imagenet     -
regnet_x_8gf       IMAGENET1K_V2             * regnet_x_8gf-2b70d774.pth              39572648  7.995    81.682 95.678 232 224 bilinear imagenet     -
regnet_y_128gf     IMAGENET1K_SWAG_E2E_V1    * regnet_y_128gf_swag-c8ce3e52.pth       644812894 374.57   88.228 98.682 384 384 bicubic  imagenet     -
regnet_y_128gf     IMAGENET1K_SWAG_LINEAR_V1 - regnet_y_128gf_lc_swag-cbe8ce12.pth    644812894 127.518  86.068 97.844 224 224 bicubic  imagenet     -
regnet_y_16gf      IMAGENET1K_V1             - regnet_y_16gf-9e6ed7dd.pth             83590140  15.912   80.424 95.24  256 224 bilinear imagenet     -
regnet_y_16gf      IMAGENET1K_V2             * regnet_y_16gf-3e4a00f9.pth             83590140  15.912   82.886 96.328 232 224 bilinear imagenet     -
regnet_y_16gf      IMAGENET1K_SWAG_E2E_V1    - regnet_y_16gf_swag-43afe44d.pth        83590140  46.735   86.012 98.054 384 384 bicubic  imagenet     -
regnet_y_16gf      IMAGENET1K_SWAG_LINEAR_V1 - regnet_y_16gf_lc_swag-f3ec0043.pth     83590140  15.912   83.976 97.244 224 224 bicubic  imagenet     -
regnet_y_1_6gf     IMAGENET1K_V1             - regnet_y_1_6gf-b11a554e.pth            11202430  1.612    77.95  93.966 256 224 bilinear imagenet     -
regnet_y_1_6gf     IMAGENET1K_V2             * regnet_y_1_6gf-0d7bc02a.pth            11202430  1.612    80.876 95.444 232 224 bilinear imagenet     -
regnet_y_32gf      IMAGENET1K_V1             - regnet_y_32gf-4dee3f7a.pth             145046770 32.28    80.878 95.34  256 224 bilinear imagenet     -
regnet_y_32gf      IMAGENET1K_V2             * regnet_y_32gf-8db6d4b5.pth             145046770 32.28    83.368 96.498 232 224 bilinear imagenet     -
regnet_y_32gf      IMAGENET1K_SWAG_E2E_V1    - regnet_y_32gf_swag-04fdfa75.pth        145046770 94.826   86.838 98.362 384 384 bicubic  imagenet     -
regnet_y_32gf      IMAGENET1K_SWAG_LINEAR_V1 - regnet_y_32gf_lc_swag-e1583746.pth     145046770 32.28    84.622 97.48  224 224 bicubic  imagenet     -
regnet_y_3_2gf     IMAGENET1K_V1             - regnet_y_3_2gf-b5a9779c.pth            19436338  3.176    78.948 94.576 256 224 bilinear imagenet     -
regnet_y_3_2gf     IMAGENET1K_V2             * regnet_y_3_2gf-9180c971.pth            19436338  3.176    81.982 95.972 232 224 bilinear imagenet     -
regnet_y_400mf     IMAGENET1K_V1             - regnet_y_400mf-c65dace8.pth            4344144   0.402    74.046 91.716 256 224 bilinear imagenet     -
regnet_y_400mf     IMAGENET1K_V2             * regnet_y_400mf-e6988f5f.pth            4344144   0.402    75.804 92.742 232 224 bilinear imagenet     -
regnet_y_800mf     IMAGENET1K_V1             - regnet_y_800mf-1b27b58c.pth            6432512   0.834    76.42  93.136 256 224 bilinear imagenet     -
regnet_y_800mf     IMAGENET1K_V2             * regnet_y_800mf-58fc7688.pth            6432512   0.834    78.828 94.502 232 224 bilinear imagenet     -
regnet_y_8gf       IMAGENET1K_V1             - regnet_y_8gf-d0d0e4a8.pth              39381472  8.473    80.032 95.048 256 224 bilinear imagenet     -
regnet_y_8gf       IMAGENET1K_V2             * regnet_y_8gf-dc2b1b54.pth              39381472  8.473    82.828 96.33  232 224 bilinear imagenet     -
resnet101          IMAGENET1K_V1             - resnet101-63fe2227.pth                 44549160  7.801    77.374 93.546 256 224 bilinear imagenet     -
resnet101          IMAGENET1K_V2             * resnet101-cd907fc2.pth                 44549160  7.801    81.886 95.78  232 224 bilinear imagenet     -
resnet152          IMAGENET1K_V1             - resnet152-394f9c45.pth                 60192808  11.514   78.312 94.046 256 224 bilinear imagenet     -
resnet152          IMAGENET1K_V2             * resnet152-f82ba261.pth                 60192808  11.514   82.284 96.002 232 224 bilinear imagenet     -
resnet18           IMAGENET1K_V1             * resnet18-f37072fd.pth                  11689512  1.814    69.758 89.078 256 224 bilinear imagenet     -
resnet34           IMAGENET1K_V1             * resnet34-b627a593.pth                  21797672  3.664    73.314 91.42  256 224 bilinear imagenet     -
resnet50           IMAGENET1K_V1             - resnet50-0676ba61.pth                  25557032  4.089    76.13  92.862 256 224 bilinear imagenet     -
resnet50           IMAGENET1K_V2             * resnet50-11ad3fa6.pth                  25557032  4.089    80.858 95.434 232 224 bilinear imagenet     -
resnext101_32x8d   IMAGENET1K_V1             - resnext101_32x8d-8ba56ff5.pth          88791336  16.414   79.312 94.526 256 224 bilinear imagenet     -
resnext101_32x8d   IMAGENET1K_V2             * resnext101_32x8d-110c445d.pth          88791336  16.414   82.834 96.228 232 224 bilinear imagenet     -
resnext101_64x4d   IMAGENET1K_V1             * resnext101_64x4d-173b62eb.pth          83455272  15.46    83.246 96.454 232 224 bilinear imagenet     -
resnext50_32x4d    IMAGENET1K_V1             - resnext50_32x4d-7cdf4587.pth           25028904  4.23     77.618 93.698 256 224 bilinear imagenet     -
resnext50_32x4d    IMAGENET1K_V2             * resnext50_32x4d-1a0047aa.pth           25028904  4.23     81.198 95.34  232 224 bilinear imagenet     -
shufflenet_v2_x0_5 IMAGENET1K_V1             * shufflenetv2_x0.5-f707e7126e.pth       1366792   0.04     60.552 81.746 256 224 bilinear imagenet     -
shufflenet_v2_x1_0 IMAGENET1K_V1             * shufflenetv2_x1-5666bf0f80.pth         2278604   0.145    69.362 88.316 256 224 bilinear imagenet     -
shufflenet_v2_x1_5 IMAGENET1K_V1             * shufflenetv2_x1_5-3c479a10.pth         3503624   0.296    72.996 91.086 232 224 bilinear imagenet     -
shufflenet_v2_x2_0 IMAGENET1K_V1             * shufflenetv2_x2_0-8be3c8ee.pth         7393996   0.583    76.23  93.006 232 224 bilinear imagenet     -
squeezenet1_0      IMAGENET1K_V1             * squeezenet1_0-b66bff10.pth             1248424   0.819    58.092 80.42  256 224 bilinear imagenet     -
squeezenet1_1      IMAGENET1K_V1             * squeezenet1_1-b8a52dc0.pth             1235496   0.349    58.178 80.624 256 224 bilinear imagenet     -
swin_b             IMAGENET1K_V1             * swin_b-68c6b09e.pth                    87768224  15.431   83.582 96.64  238 224 bicubic  imagenet     -
swin_s             IMAGENET1K_V1             * swin_s-5e29d889.pth                    49606258  8.741    83.196 96.36  246 224 bicubic  imagenet     -
swin_t             IMAGENET1K_V1             * swin_t-704ceda3.pth                    28288354  4.491    81.474 95.776 232 224 bicubic  imagenet     -
swin_v2_b          IMAGENET1K_V1             * swin_v2_b-781e5279.pth                 87930848  20.325   84.112 96.864 272 256 bicubic  imagenet     -
swin_v2_s          IMAGENET1K_V1             * swin_v2_s-637d8ceb.pth                 49737442  11.546   83.712 96.816 260 256 bicubic  imagenet     -
swin_v2_t          IMAGENET1K_V1             * swin_v2_t-b137f0e2.pth                 28351570  5.94     82.072 96.132 260 256 bicubic  imagenet     -
vgg11              IMAGENET1K_V1             * vgg11-8a719046.pth                     132863336 7.609    69.02  88.628 256 224 bilinear imagenet     -
vgg11_bn           IMAGENET1K_V1             * vgg11_bn-6002323d.pth                  132868840 7.609    70.37  89.81  256 224 bilinear imagenet     -
vgg13              IMAGENET1K_V1             * vgg13-19584684.pth                     133047848 11.308   69.928 89.246 256 224 bilinear imagenet     -
vgg13_bn           IMAGENET1K_V1             * vgg13_bn-abd245e5.pth                  133053736 11.308   71.586 90.374 256 224 bilinear imagenet     -
vgg16              IMAGENET1K_V1             * vgg16-397923af.pth                     138357544 15.47    71.592 90.382 256 224 bilinear imagenet     -
vgg16              IMAGENET1K_FEATURES       - vgg16_features-amdegroot-88682ab5.pth  138357544 15.47    -      -      256 224 bilinear vgg_features -
vgg16_bn           IMAGENET1K_V1             * vgg16_bn-6c64b313.pth                  138365992 15.47    73.36  91.516 256 224 bilinear imagenet     -
vgg19              IMAGENET1K_V1             * vgg19-dcbb9e9d.pth                     143667240 19.632   72.376 90.876 256 224 bilinear imagenet     -
vgg19_bn           IMAGENET1K_V1             * vgg19_bn-c79401a0.pth                  143678248 19.632   74.218 91.842 256 224 bilinear imagenet     -
vit_b_16           IMAGENET1K_V1             * vit_b_16-c867db91.pth                  86567656  17.564   81.072 95.318 256 224 bilinear imagenet     -
vit_b_16           IMAGENET1K_SWAG_E2E_V1    - vit_b_16_swag-9ac1b537.pth             86859496  55.484   85.304 97.65  384 384 bicubic  imagenet     -
vit_b_16           IMAGENET1K_SWAG_LINEAR_V1 - vit_b_16_lc_swag-4e70ced5.pth          86567656  17.564   81.886 96.18  224 224 bicubic  imagenet     -
vit_b_32           IMAGENET1K_V1             * vit_b_32-d86f8d99.pth                  88224232  4.409    75.912 92.466 256 224 bilinear imagenet     -
vit_h_14           IMAGENET1K_SWAG_E2E_V1    * vit_h_14_swag-80465313.pth             633470440 1016.717 88.552 98.694 518 518 bicubic  imagenet     -
vit_h_14           IMAGENET1K_SWAG_LINEAR_V1 - vit_h_14_lc_swag-c1eb923e.pth          632045800 167.295  85.708 97.73  224 224 bicubic  imagenet     -
vit_l_16           IMAGENET1K_V1             * vit_l_16-852ce7e3.pth                  304326632 61.555   79.662 94.638 242 224 bilinear imagenet     -
vit_l_16           IMAGENET1K_SWAG_E2E_V1    - vit_l_16_swag-4f3808c9.pth             305174504 361.986  88.064 98.512 512 512 bicubic  imagenet     -
vit_l_16           IMAGENET1K_SWAG_LINEAR_V1 - vit_l_16_lc_swag-4d563306.pth          304326632 61.555   85.146 97.422 224 224 bicubic  imagenet     -
vit_l_32           IMAGENET1K_V1             * vit_l_32-c7638314.pth                  306535400 15.378   76.972 93.07  256 224 bilinear imagenet     -
wide_resnet101_2   IMAGENET1K_V1             - wide_resnet101_2-32ee1156.pth          126886696 22.753   78.848 94.284 256 224 bilinear imagenet     -
wide_resnet101_2   IMAGENET1K_V2             * wide_resnet101_2-d733dc28.pth          126886696 22.753   82.51  96.02  232 224 bilinear imagenet     -
wide_resnet50_2    IMAGENET1K_V1             - wide_resnet50_2-95faca4d.pth           68883240  11.398   78.468 94.086 256 224 bilinear imagenet     -
wide_resnet50_2    IMAGENET1K_V2             * wide_resnet50_2-9ba9bcbe.pth           68883240  11.398   81.602 95.758 232 224 bilinear imagenet     -
"""

#: Checkpoints of models torchvision lacks. timm: ``legacy_xception.tf_in1k`` (Keras/TF Xception
#: port; Cadene reports 78.888/94.292 for the same file), ``mobilenetv1_100.ra4_e3600_r224_in1k``
#: (timm's MobileNetV1 trained with the ra4 recipe, on the Hugging Face hub; its file name carries
#: no hash, and no accuracy is in the reference facts). Cadene pretrainedmodels ``bninception``
#: ('imagenet', Xiong's Caffe port of BN-Inception; Cadene's eval transform: resize 256 = 224 /
#: 0.875 bilinear, crop 224, BGR 0-255 minus (104, 117, 128)). GFLOPs: fvcore multiply-adds.
_OTHER_WEIGHTS = (
    dict(
        model="xception", tag="TF_IN1K", default=True, source="timm",
        url="https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-cadene/xception-43020ad28.pth",
        file="xception-43020ad28.pth", num_params=22855952, gflops=8.4, acc1=78.888, acc5=94.292,
        resize=333, crop=299, interpolation="bicubic", norm="inception",
        note="timm legacy_xception.tf_in1k (= Cadene pretrainedmodels xception 'imagenet'); accuracy as reported by Cadene",
    ),
    dict(
        model="mobilenet_v1", tag="RA4_E3600_R224_IN1K", default=True, source="timm",
        url="https://huggingface.co/timm/mobilenetv1_100.ra4_e3600_r224_in1k/resolve/main/model.safetensors",
        file="mobilenetv1_100.ra4_e3600_r224_in1k.safetensors", num_params=4231976, gflops=0.579,
        acc1=None, acc5=None, resize=256, crop=224, interpolation="bicubic", norm="inception",
        note="timm mobilenetv1_100.ra4_e3600_r224_in1k (Hugging Face hub model.safetensors; no hash in the file "
        "name, so the download is not hash-checked); timm evaluates it at 256 px (test_input_size) as well",
    ),
    dict(
        model="inception_v2", tag="IMAGENET", default=True, source="pretrainedmodels",
        url="http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth",
        file="bn_inception-52deb4733.pth", num_params=11295240, gflops=2.04, acc1=73.524, acc5=91.562,
        resize=256, crop=224, interpolation="bilinear", norm="caffe_bgr",
        note="Cadene pretrainedmodels bninception 'imagenet' (Caffe port; BGR, 0-255, mean 104/117/128)",
    ),
)

_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's rule: ``name-<sha256 prefix>.ext``


@dataclass(frozen=True)
class Weights:
    """One published checkpoint and how it was evaluated (facts; nothing is downloaded)."""

    model: str  # vafunc / torchvision model name
    tag: str  # "IMAGENET1K_V1", ...
    is_default: bool
    source: str  # "torchvision", "timm" or "pretrainedmodels"
    url: str
    file: str  # the torch.hub cache file name
    num_params: int
    gflops: float | None  # multiply-adds at the crop size, in 1e9
    acc1: float | None  # reported ImageNet-1k top-1 (percent)
    acc5: float | None
    resize_size: int
    crop_size: int
    interpolation: str
    normalization: str  # key of NORMALIZATIONS
    config: tuple = ()  # ((key, value), ...) the model config the checkpoint needs
    note: str = ""
    has_categories: bool = True  # False: a feature extractor (VGG16 IMAGENET1K_FEATURES)

    @property
    def name(self) -> str:
        return f"{self.model}.{self.tag}"

    @property
    def hash_prefix(self) -> str | None:
        """The SHA-256 prefix in the file name (what torch.hub checks), or ``None``."""
        m = _HASH_IN_NAME.search(self.file)
        return m.group(1) if m else None

    @property
    def mean(self) -> tuple:
        return NORMALIZATIONS[self.normalization][0]

    @property
    def std(self) -> tuple:
        return NORMALIZATIONS[self.normalization][1]

    @property
    def channel_order(self) -> str:
        return NORMALIZATIONS[self.normalization][2]

    @property
    def input_scale(self) -> float:
        return NORMALIZATIONS[self.normalization][3]

    @property
    def categories(self) -> tuple[str, ...] | None:
        """ImageNet-1k class names, or ``None`` for feature-extractor weights (VGG16 FEATURES)."""
        return IMAGENET_CATEGORIES if self.has_categories else None

    @property
    def cache_path(self) -> Path:
        return cache_dir() / self.file

    def transforms(self, *, method: str = "pil"):
        """The evaluation transform (:class:`vafunc.transforms.Transform`)."""
        from .transforms import Transform

        return Transform(
            resize_size=self.resize_size,
            crop_size=self.crop_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            channel_order=self.channel_order,
            input_scale=self.input_scale,
            method=method,
        )

    @property
    def meta(self) -> dict:
        """JSON-friendly facts (used by ``vafunc info``)."""
        return {
            "tag": self.tag,
            "default": self.is_default,
            "source": self.source,
            "file": self.file,
            "url": self.url,
            "hash_prefix": self.hash_prefix,
            "num_params": self.num_params,
            "gflops": self.gflops,
            "acc1": self.acc1,
            "acc5": self.acc5,
            "transform": {
                "resize": self.resize_size,
                "crop": self.crop_size,
                "interpolation": self.interpolation,
                "mean": list(self.mean),
                "std": list(self.std),
                "channel_order": self.channel_order,
                "input_scale": self.input_scale,
            },
            "config": dict(self.config),
            "categories": "imagenet-1k" if self.categories else None,
            **({"note": self.note} if self.note else {}),
        }


def _parse_config(text: str) -> tuple:
    if text == "-":
        return ()
    out = []
    for item in text.split(","):
        k, v = item.split("=")
        out.append((k, {"True": True, "False": False}.get(v, int(v) if v.isdigit() else v)))
    return tuple(out)


def _num(text: str):
    return None if text == "-" else float(text)


@functools.lru_cache(maxsize=None)
def _table() -> dict[str, tuple[Weights, ...]]:
    rows: dict[str, list[Weights]] = {}
    for line in _TORCHVISION_TABLE.strip().splitlines():
        model, tag, default, file, params, gflops, acc1, acc5, resize, crop, interp, norm, cfg = line.split()
        rows.setdefault(model, []).append(
            Weights(model, tag, default == "*", "torchvision", _TORCHVISION_URL + file, file, int(params),
                    _num(gflops), _num(acc1), _num(acc5), int(resize), int(crop), interp, norm, _parse_config(cfg),
                    has_categories=acc1 != "-")
        )
    for d in _OTHER_WEIGHTS:
        rows.setdefault(d["model"], []).append(
            Weights(d["model"], d["tag"], d["default"], d["source"], d["url"], d["file"], d["num_params"],
                    d["gflops"], d["acc1"], d["acc5"], d["resize"], d["crop"], d["interpolation"], d["norm"],
                    tuple(d.get("config", ())), d.get("note", ""))
        )
    return {k: tuple(v) for k, v in rows.items()}


def _model_name(model) -> str:
    if isinstance(model, str):
        return model
    if isinstance(model, registry.ModelDef):
        return model.name
    raise TypeError(f"expected a model name or a vafunc ModelDef, got {type(model).__name__}")


def list_weights(model=None) -> list[Weights]:
    """All published checkpoints (of one model, if given; default first)."""
    table = _table()
    if model is None:
        return [w for ws in table.values() for w in ws]
    return sorted(table.get(_model_name(model), ()), key=lambda w: not w.is_default)


def get_weights(model, tag: str = "DEFAULT") -> Weights:
    """The checkpoint ``tag`` of ``model``: ``"DEFAULT"``, ``"IMAGENET1K_V2"``, torchvision's
    ``"ResNet50_Weights.IMAGENET1K_V2"`` or timm's ``"legacy_xception.tf_in1k"`` (any case)."""
    if isinstance(tag, Weights):
        return tag
    name = _model_name(model)
    if not isinstance(tag, str):
        raise TypeError(f"weights tag must be a str, got {type(tag).__name__}")
    available = list_weights(name)
    if not available:
        registry.get_entry(name)  # unknown model -> its own error, with suggestions
        raise WeightsError(
            f"{name} has no published weights in vafunc's table; pass a checkpoint file path instead "
            "(vafunc.hub.list_weights() lists the published checkpoints)"
        )
    key = tag.rsplit(".", 1)[-1].upper()
    if key == "DEFAULT":
        return next(w for w in available if w.is_default)
    for w in available:
        if w.tag == key:
            return w
    raise WeightsError(f"{name} has no weights {tag!r}; available: {', '.join(['DEFAULT'] + [w.tag for w in available])}")


def find_weights(path) -> Weights | None:
    """The table entry whose file name is ``path``'s name, if any."""
    base = Path(path).name
    for w in list_weights():
        if w.file == base:
            return w
    return None


def cache_dir() -> Path:
    """torch.hub's checkpoint cache: ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


# --------------------------------------------------------------------------- reading files


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # torch's legacy (pre-1.6) format starts with a pickled magic number
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    return None


def _unsafe_global(message: str) -> str | None:
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message) or re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return m.group(1)
    m = re.search(r"Unsupported (?:class|operand)[^\n]*", message)
    return m.group(0) if m else None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        msg = str(err)
        bad = _unsafe_global(msg) if "Weights only load failed" in msg else None
        if bad:
            raise WeightsError(
                f"{path}: refused to load: the file is a pickle that would import {bad}, i.e. run code "
                "from the file, not just read tensors (torch.load(weights_only=True) allows only tensors "
                "and plain containers). If you trust its source, load it yourself with "
                "torch.load(path, weights_only=False) and pass the state_dict to vafunc.from_state_dict"
            ) from None
        raise WeightsError(f"{path}: truncated or corrupt PyTorch checkpoint ({msg.splitlines()[0][:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as err:
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise WeightsError(f"{path}: truncated or corrupt PyTorch checkpoint ({first})") from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError(f"{path} is a safetensors file; reading it needs safetensors: {SAFETENSORS_HINT}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on bad files
        if isinstance(err, ImportError):
            raise
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise WeightsError(f"{path}: truncated or corrupt safetensors file ({first})") from None
    return flat, meta


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "model_ema", "module")


def _as_state_dict(obj: Any, path: Path) -> tuple[dict, list[str]]:
    """A flat ``{name: tensor}`` from what a checkpoint file holds (unwrapping the usual training
    checkpoint wrappers and DataParallel's ``module.`` prefix, with a note)."""
    notes = []
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)")
    if obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in _WRAPPER_KEYS:
            inner = obj.get(k)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                notes.append(f"using the state_dict under checkpoint[{k!r}]")
                obj = inner
                break
        else:
            bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise WeightsError(
                f"{path}: not a state_dict: {len(bad)} entries are not tensors ({', '.join(bad[:8])}"
                f"{', ...' if len(bad) > 8 else ''}), and none of {list(_WRAPPER_KEYS)} holds one"
            )
    if not obj:
        raise WeightsError(f"{path}: the checkpoint holds no tensors")
    flat = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in flat):
        flat = {k[len("module."):]: v for k, v in flat.items()}
        notes.append("removed the 'module.' prefix (a DataParallel checkpoint)")
    return flat, notes


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Read a checkpoint file: ``(flat state_dict, metadata, notes)``. Nothing is checked against a
    model here; the format is recognised from the content (``.pth``/``.pt`` zip or legacy pickle,
    ``.safetensors``), whatever the suffix."""
    path = Path(os.fspath(path)).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty")
    kind = _sniff(path)
    if kind == "safetensors":
        flat, meta = _read_safetensors(path)
        notes = []
        if not flat:
            raise WeightsError(f"{path}: the safetensors file holds no tensors")
    elif kind in ("zip", "pickle"):
        obj = _read_torch(path)
        flat, notes = _as_state_dict(obj, path)
        meta = {}
    else:
        with open(path, "rb") as f:
            head = f.read(12)
        raise WeightsError(
            f"{path}: not a checkpoint: expected a PyTorch file (.pth/.pt: a zip archive or a pickle) or a "
            f".safetensors file, but the file starts with {head!r}"
        )
    return flat, meta, notes


# --------------------------------------------------------------------------- loading into a model


@functools.lru_cache(maxsize=None)
def _shapes(name: str) -> dict:
    return registry.get_model(name).state_dict_shapes()


def identify(flat: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered models (default configs) whose state_dict the checkpoint fits exactly, after each
    family's legacy-name translation."""
    found = []
    for name in registry.list_models():
        model = registry.get_model(name)
        shapes = _shapes(name)
        cand = dict(flat)
        if model.family.remap is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cand, _ = model.family.remap(model.config, cand)
            except (ValueError, TypeError, KeyError):
                continue
        for k in shapes:
            if k.endswith(".num_batches_tracked") and k not in cand and k[:-19] + "running_mean" in cand:
                cand[k] = None
        if set(cand) == set(shapes) and all(v is None or tuple(v.shape) == shapes[k] for k, v in cand.items()):
            found.append(name)
    return found


def _mismatch_hint(model, flat: dict) -> str:
    hints = []
    cfg = model.config
    shapes = model.state_dict_shapes()
    bad = [k for k in shapes if k in flat and tuple(flat[k].shape) != shapes[k]]
    if bad and hasattr(cfg, "num_classes") and all(shapes[k][:1] == (cfg.num_classes,) for k in bad):
        got = {int(flat[k].shape[0]) for k in bad}
        if len(got) == 1:
            n = got.pop()
            hints.append(f"the checkpoint's classifier has {n} classes: build the model with num_classes={n}")
    fits = [n for n in identify(flat) if n != model.name]
    if fits:
        hints.append(f"the checkpoint fits {', '.join(fits)}")
    return ("\nhint: " + "; ".join(hints)) if hints else ""


def _config_warning(model, w: Weights) -> None:
    cfg = model.config
    wrong = {k: v for k, v in w.config if getattr(cfg, k, v) != v}
    if wrong:
        fix = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        warnings.warn(
            f"{w.name} was trained for {model.name} with {fix}, but this model has "
            + ", ".join(f"{k}={getattr(cfg, k)!r}" for k in wrong)
            + f"; its predictions will differ from the published ones. Build it with "
            f"vafunc.get_model({model.name!r}, {fix}) or use vafunc.hub.pretrained({model.name!r}, {w.tag!r})",
            stacklevel=3,
        )


def _offline() -> str | None:
    for var in ("VAFUNC_OFFLINE", "HF_HUB_OFFLINE", "TORCH_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    return None


def fetch(weights: Weights, *, download: bool = True, progress: bool = True) -> Path:
    """The cache path of ``weights``, downloading the file (hash-checked) if it is not there yet."""
    dst = weights.cache_path
    if dst.is_file():
        return dst
    where = (
        f"Download {weights.url} on a machine with network access and put it at {dst} (the torch.hub "
        f"cache, $TORCH_HOME/hub/checkpoints), or pass the file's path instead of the tag"
    )
    reason = "download=False" if not download else _offline()
    if reason:
        raise WeightsError(f"{weights.name}: {weights.file} is not in the cache and downloading is off ({reason}). {where}")
    import urllib.error

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(dst), hash_prefix=weights.hash_prefix, progress=progress)
    except RuntimeError as err:
        if "hash" in str(err):
            raise WeightsError(
                f"{weights.name}: the file downloaded from {weights.url} does not match the SHA-256 prefix "
                f"{weights.hash_prefix} in its name (a corrupt or altered download); nothing was saved. {where}"
            ) from None
        raise
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise WeightsError(f"{weights.name}: cannot download {weights.url} ({reason}); offline? {where}") from None
    return dst


def verify_hash(path) -> str:
    """Check ``path``'s SHA-256 against the hash prefix in its name (``name-<prefix>.ext``)."""
    import hashlib

    path = Path(path)
    m = _HASH_IN_NAME.search(path.name)
    if not m:
        raise WeightsError(f"{path}: the file name has no hash prefix (name-<sha256 prefix>.ext) to check against")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if not digest.startswith(m.group(1)):
        raise WeightsError(
            f"{path}: SHA-256 {digest[: len(m.group(1))]}... does not match the prefix {m.group(1)} in its name: "
            "the file is corrupt or not the published one"
        )
    return digest


def _resolve(model, weights) -> tuple[Path, Weights | None]:
    """``weights`` (a tag, a :class:`Weights` or a path) -> (file path, table entry or None)."""
    if isinstance(weights, Weights):
        return None, weights
    if isinstance(weights, os.PathLike):
        path = Path(weights)
        return path, find_weights(path)
    if not isinstance(weights, str):
        raise TypeError(f"weights must be a tag (str), a path or a vafunc.hub.Weights, got {type(weights).__name__}")
    looks_like_path = (
        os.sep in weights or "/" in weights or Path(weights).suffix.lower() in (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar")
    )
    if looks_like_path or Path(weights).is_file():
        path = Path(weights)
        return path, find_weights(path)
    return None, get_weights(model, weights)


def load_weights(
    model,
    weights="DEFAULT",
    *,
    device=None,
    dtype: torch.dtype | None = None,
    download: bool = True,
    progress: bool = True,
    check_hash: bool = False,
) -> tuple[dict, dict]:
    """Load a checkpoint into ``(params, state)`` for ``model`` (a :class:`vafunc.ModelDef` or a name).

    ``weights``: a tag (``"DEFAULT"``, ``"IMAGENET1K_V2"``, ...) that resolves to the torch.hub cache
    file (downloaded with hash checking if missing and ``download`` is true), or a path to a
    ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``) or ``.safetensors`` file. The
    load is strict: a checkpoint that does not fit raises :class:`WeightsError` listing every
    missing, unexpected and mis-shaped key, and nothing is returned half-loaded. ``device`` /
    ``dtype`` move and cast the tensors (floating-point ones only for ``dtype``).
    ``check_hash=True`` also checks the file's SHA-256 against the prefix in its name (torch.hub
    checks it when downloading; this re-checks a cached or copied file).
    """
    if isinstance(model, str):
        model = registry.get_model(model)
    if not isinstance(model, registry.ModelDef):
        raise TypeError(f"load_weights expects a vafunc ModelDef or a model name, got {type(model).__name__}")
    path, w = _resolve(model, weights)
    if path is None:
        if w.model != model.name:
            raise WeightsError(f"{w.name} are weights for {w.model}, not for {model.name}")
        path = fetch(w, download=download, progress=progress)
    if w is not None and w.model == model.name:
        _config_warning(model, w)
    if check_hash:
        verify_hash(path)
    flat, _meta, notes = read_checkpoint(path)
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params, state = from_state_dict(model, flat)
    except (StateDictMismatch, ValueError, TypeError) as err:
        raise WeightsError(f"{path} does not fit {model.name}: {err}{_mismatch_hint(model, flat)}") from None
    for c in caught:
        warnings.warn(f"{path}: {c.message}", c.category, stacklevel=2)
    if device is not None or dtype is not None:

        def move(t):
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device) if device is not None else t

        params, state = vtree.tree_map(move, params), vtree.tree_map(move, state)
    return params, state


def pretrained(name: str, weights: str = "DEFAULT", *, download: bool = True, device=None, **config):
    """``(model, params, state)``: the model built with the config the checkpoint needs (plus
    ``config`` overrides), and the loaded weights. ``weights`` is a tag or a path."""
    path, w = _resolve(name, weights)
    need = dict(w.config) if (w is not None and w.model == name) else {}
    model = registry.get_model(name, **{**need, **config})
    params, state = load_weights(model, weights if path is not None else w, device=device, download=download)
    return model, params, state


# --------------------------------------------------------------------------- writing files


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path, write) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path`` and rename it over ``path``
    only once complete and flushed to disk: an interrupted write leaves no file (or the old one)."""
    path = Path(os.fspath(path))
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise WeightsError(f"{path}: the folder {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _plain_tensors(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in flat.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_weights: {k} is a {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise ValueError(f"save_weights: {k} is a meta tensor (no data); initialise the model on a real device")
        t = v.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen and t.numel():
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_weights(params, state, path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``(params, state)`` as a reference-named state_dict to ``path``, atomically.

    ``.safetensors`` (needs ``safetensors``; ``metadata`` goes into its header) or ``.pth``/``.pt``
    (``torch.save``, loadable by ``torch.load(weights_only=True)`` and torchvision's
    ``load_state_dict``). The file appears under its final name only once completely written.
    """
    path = Path(os.fspath(path))
    suffix = path.suffix.lower()
    flat = _plain_tensors(vtree.to_state_dict(params, state))
    if suffix == ".safetensors":
        try:
            from safetensors.torch import save as st_save
        except ImportError:
            raise ImportError(f"writing {path} needs safetensors: {SAFETENSORS_HINT}") from None
        meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        data = st_save(flat, metadata=meta)
        atomic_write(path, lambda f: f.write(data))
    elif suffix in (".pth", ".pt", ".bin"):
        atomic_write(path, lambda f: torch.save(flat, f))
    else:
        raise WeightsError(f"{path}: unknown checkpoint suffix {suffix!r}; use .safetensors, .pth or .pt")
    return path
