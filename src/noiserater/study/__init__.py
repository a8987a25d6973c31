"""Studies: the paper's protocol (reproduce), the evidence study, their presets and reports."""
