"""Off-the-shelf fine-tune methods as shakers, one algorithm per module.

``base`` holds the shared machinery (settings, the generic ``shake``,
combinations); ``end2end``, ``dreambooth``, ``textual_inversion``, ``lora``,
``hypernetwork`` and ``combinations`` each register their shakers in
:data:`attacks.base.SHAKERS`.
"""
