"""2D -> 3D inflation, one concern per module (the public entry is :mod:`nnunetv2_vf.architectures.inflate`).

* :mod:`.weights` — pure weight maths: 2D kernel -> 3D kernel rules (i3d / centre / planar), input-conv adaptation;
* :mod:`.geometry` — the depth geometry of a layer (depth kernel, stride, padding, weight rule), shared by the
  module rewriter and the state-dict path, plus probes of a network's resolution levels;
* :mod:`.layers` — the 3D layers that have no torch counterpart (timm-style norms, SAME/replicate-padded convs);
* :mod:`.rank_check` — decides from a module's ``forward`` source whether it works on 5D tensors unchanged;
* :mod:`.timm_rules` — timm classes whose forward hard-codes 2D axes, given a rank-agnostic forward;
* :mod:`.rewriter` — ``inflate_2d_to_3d``: walks a network and replaces or checks every module;
* :mod:`.state_dict` — ``inflate_state_dict``: a 2D checkpoint mapped onto an inflated network.
"""
