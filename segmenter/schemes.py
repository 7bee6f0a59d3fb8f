"""The segmenter architectures and output class schemes by name (no Keras: the command line reads them)."""

from __future__ import annotations

ARCHS = ("unet-densenet121", "unet-mobilenetv2", "fc-densenet103")
#: "binary": lesion vs background, sigmoid. The others are softmax heads trained from one mask per
#: foreground class (a later class wins where masks overlap: lesion over lung, consolidation over
#: ground glass): "lung-lesion" background / lung / lesion; "lesion-types" background / ground-glass /
#: consolidation; "lung-lesion-types" background / lung / ground-glass / consolidation. A model with
#: a lung class gives the lung field itself (segmenter.model), so no second model is needed.
CLASS_SCHEMES = ("binary", "lung-lesion", "lesion-types", "lung-lesion-types")
#: What a segmenter was trained on: X-rays, or CT slices (cxr run --modality ct segments volumes slice by slice).
MODALITIES = ("xray", "ct")
#: The lesion types of the "*-types" schemes and the mask kinds they train from (../shared/data).
LESION_TYPES = ("ggo", "consolidation")


def channel_names(classes: str, kind: str) -> tuple[str, ...]:
    """The output channels of a class scheme (see CLASS_SCHEMES); ``kind`` names the lesion of the
    "binary" and "lung-lesion" schemes."""
    lung = ("lung",) if classes.startswith("lung-") else ()
    if classes == "binary":
        return (kind,)
    lesions = LESION_TYPES if classes.endswith("-types") else (kind,)
    return ("background", *lung, *lesions)


def lesion_channels(classes: str, channels: tuple[str, ...]) -> tuple[str, ...]:
    """The channels that are lesions: a "binary" model's one channel whatever its kind (a lung-field
    model's "lung" too), else every softmax class but background and lung."""
    if classes == "binary":
        return tuple(channels)
    return tuple(c for c in channels if c not in ("background", "lung"))
