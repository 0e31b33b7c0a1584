"""npe2 sample data: the CT-like phantom at 64³ and 128³, and the MNI152 brain (with labels)."""

from __future__ import annotations

__all__ = ["phantom_64", "phantom_128", "mni_brain", "volume_layers"]


def volume_layers(volume) -> list:
    """Image and ground-truth layer data tuples of a :class:`data_tools.Volume`."""
    from workbench.ui.napari.layers import image_layer, labels_layer

    layers = [image_layer(volume.array, spacing=volume.spacing, name=f"{volume.source_format} image")]
    if volume.labels is not None:
        layers.append(labels_layer(volume.labels, spacing=volume.spacing, name=f"{volume.source_format} labels",
                                   class_names=volume.class_names))  # fmt: skip
    for _, kwargs, _ in layers:
        kwargs["metadata"]["source"] = volume.path or volume.source_format
    return layers


def phantom_64() -> list:
    from data_tools.io import load_input

    return volume_layers(load_input("phantom:64"))


def phantom_128() -> list:
    from data_tools.io import load_input

    return volume_layers(load_input("phantom:128"))


def mni_brain() -> list:
    from data_tools.io import load_input

    return volume_layers(load_input("mni"))
