"""Pure: windows, scaling, the shape catalog, window scorers, the score normaliser, attribution."""
