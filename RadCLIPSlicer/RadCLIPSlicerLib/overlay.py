"""How per-slice relevance looks over the viewers: one colour mapping, one place (MRML only).

What Slicer's slice views can do (read in Slicer's source, measured with its renderer): a scalar
volume's display node ANDs the lookup table's alpha with its threshold mask
(`vtkMRMLScalarVolumeDisplayNode`: `AlphaLogic`, a `vtkImageLogic` AND whose true value is 255), so a
table's alpha is an on/off switch per pixel, never a partial opacity; the foreground layer is then
blended at one opacity for the whole layer (`vtkImageBlend` in `vtkMRMLSliceLogic`). Opacity cannot
rise with relevance inside one layer. So the mapping is:

- transparent at and below the uniform level (the window starts at uniform, the threshold hides
  what is below it, the table's first entries have alpha 0) and up to `CUT` of the way from uniform
  to the peak: a painted slice always gets the layer's full opacity, so a slice barely above
  uniform, which says little, is not painted at all;
- above the cut, a warm colour that turns from amber to red-orange as the slice nears the peak
  (`RAMP`): hue and saturation carry the level. No colour is darker than a CT or MR slice on
  average, none is white or grey, so a painted slice neither goes dark (PET-Heat's near-black just above uniform) nor washes out
  (PET-Heat's white peak);
- a low layer opacity (`FOREGROUND_OPACITY`): the anatomy keeps 70% of its contrast (PET-Heat at
  0.5 kept half of it), and a saturated colour at 0.3 is still plainly coloured;
- a flat curve (peak within `FLAT` of uniform) is hidden: a veil over every slice says nothing.

The colour table is one node per scene (`relevanceColorNode`), found by its singleton tag and shared
by every relevance volume; the window (uniform .. peak) does the per-result scaling. It is built
here, so it needs no colour file from Slicer's share folder (slicer-core has none).
"""
from __future__ import annotations

import numpy as np
import slicer

FLAT = 0.02  # a curve whose peak is within 2% of uniform says nothing: never paint it as a veil
CUT = 0.25  # slices below this fraction of the way from uniform to the peak stay transparent
FOREGROUND_OPACITY = 0.3  # the layer's opacity: 70% of the anatomy's contrast survives under the colour
# (fraction of the way from the cut to the peak, RGB 0-255): amber -> orange -> red-orange, luminance
# 181, 143, 100 (the chest CT's slices average about 99 in its default window)
RAMP = ((0.0, (255, 170, 40)), (0.5, (250, 110, 30)), (1.0, (235, 45, 25)))
LEVELS = 256  # table entries: the window maps uniform .. peak onto 0 .. 255
COLOR_NODE_TAG = "RadCLIPRelevance"
COLOR_NODE_NAME = "RadCLIP relevance"


def relevanceColors(levels: int = LEVELS) -> np.ndarray:
    """(levels, 4) RGBA in 0..1 for levels from uniform (row 0) to the peak (last row): alpha 0 and
    grey below `CUT` (what a colour legend shows for "not painted"), alpha 1 from it on (Slicer uses
    table alpha as on/off) with the colour along `RAMP`."""
    t = np.linspace(0.0, 1.0, levels)
    s = np.clip((t - CUT) / (1.0 - CUT), 0.0, 1.0)
    stops = np.array([p for p, _ in RAMP])
    rgb = np.array([c for _, c in RAMP], dtype=float) / 255.0
    colours = np.stack([np.interp(s, stops, rgb[:, ch]) for ch in range(3)], axis=1)
    alpha = (t >= CUT).astype(float)
    colours[alpha == 0] = 0.5
    return np.c_[colours, alpha]


def relevanceColorNode(scene):
    """The scene's relevance colour table: made on first use, then found by its singleton tag (a
    singleton survives closing the scene; it is refilled if anything changed its colours)."""
    node = scene.GetSingletonNode(COLOR_NODE_TAG, "vtkMRMLColorTableNode")
    if node is None:
        node = slicer.vtkMRMLColorTableNode()
        node.SetSingletonTag(COLOR_NODE_TAG)
        node.SetName(COLOR_NODE_NAME)
        node = scene.AddNode(node)
    colours = relevanceColors()
    table = node.GetLookupTable()
    if node.GetNumberOfColors() != len(colours) or not np.allclose(
            [table.GetTableValue(i) for i in range(len(colours))], colours, atol=1e-6):
        node.SetTypeToUser()
        node.SetNumberOfColors(len(colours))
        for i, (r, g, b, a) in enumerate(colours):
            node.SetColor(i, f"{i / (len(colours) - 1):.3f}", r, g, b, a)  # named by fraction uniform -> peak
        node.GetLookupTable().SetRange(0, len(colours) - 1)  # 0..255: the window's output, used as is
    return node


def applyRelevanceDisplay(relevanceNode, weights) -> bool:
    """Colour, window and threshold of the relevance volume for per-slice `weights` (sum 1).
    Returns whether the overlay shows anything (a flat curve is hidden)."""
    weights = np.asarray(weights, dtype=np.float32)
    if relevanceNode.GetDisplayNode() is None:
        relevanceNode.CreateDefaultDisplayNodes()
    display = relevanceNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(relevanceColorNode(relevanceNode.GetScene()).GetID())
    uniform, peak = 1.0 / len(weights), float(weights.max())
    visible = peak > uniform * (1 + FLAT)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(uniform, peak if visible else uniform * (1 + FLAT))
    display.SetApplyThreshold(True)  # below the uniform level: transparent, not a dark veil
    display.SetThreshold(uniform if visible else peak + 1.0, max(peak, uniform) + 1.0)
    display.SetInterpolate(False)  # one colour per input slice, no ramps between slices
    display.SetVisibility(visible)
    return visible
