"""The lab model's world: synthetic scenes with exact captions (scenes.py) and a checker that reads
them back from any image (check.py), so a small SD can be trained and its prompt-following measured
offline. Import the submodules directly: scenes needs only PIL, check needs torch.
"""
