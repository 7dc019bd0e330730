"""How per-slice relevance looks over the viewers: one colour mapping, one place (MRML only).

(Placeholder: being redesigned for issue 18 item 6. Today's PET-Heat mapping, unchanged.)
"""
from __future__ import annotations

import numpy as np

HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
FLAT = 0.02  # a curve whose peak is within 2% of uniform says nothing: never paint it as a veil
FOREGROUND_OPACITY = 0.5


def applyRelevanceDisplay(relevanceNode, weights) -> bool:
    """Colour, window and threshold of the relevance volume for per-slice `weights` (sum 1).
    Returns whether the overlay shows anything (a flat curve is hidden)."""
    weights = np.asarray(weights, dtype=np.float32)
    if relevanceNode.GetDisplayNode() is None:
        relevanceNode.CreateDefaultDisplayNodes()
    display = relevanceNode.GetDisplayNode()
    if relevanceNode.GetScene().GetNodeByID(HEAT_COLOR_NODE_ID) is not None:
        display.SetAndObserveColorNodeID(HEAT_COLOR_NODE_ID)
    uniform, peak = 1.0 / len(weights), float(weights.max())
    visible = peak > uniform * (1 + FLAT)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(uniform, peak if visible else uniform * (1 + FLAT))
    display.SetApplyThreshold(True)  # below the uniform level: transparent, not a dark veil
    display.SetThreshold(uniform if visible else peak + 1.0, max(peak, uniform) + 1.0)
    display.SetInterpolate(False)
    display.SetVisibility(visible)
    return visible
