"""The shipped lab model (lab/lab-sd.safetensors + lab/tokenizer/): it loads through the normal loader
with nothing but its path, and draws what one-object captions say."""
import os

from lab.check import check
from lab.run_config import LAB
from lab.scenes import sample_captions
from model import load_checkpoint
from sampler.generate import Sampling, generate

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab", "lab-sd.safetensors")


def test_shipped_model_loads_with_its_config_and_tokenizer():
    sd = load_checkpoint(SHIPPED)
    assert sd.config.unet == LAB.unet and sd.config.vae == LAB.vae and sd.config.text == LAB.text
    assert sd.config.image_size == 128 and sd.config.guidance == LAB.guidance
    for word in ("red", "yellow", "triangle", "square", "above", "below"):
        assert len(sd.text.tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_shipped_model_draws_one_object_captions():
    """PLMS-20 on 8 captions, as the README's quick start: measured 8 of 8 (97.7% of 131 at PLMS-50)."""
    sd = load_checkpoint(SHIPPED)
    captions = sample_captions(8, seed="test/0", pairs=0.0)
    images = generate(sd, captions, Sampling(steps=20, seed=0, batch_size=8))
    verdicts = [check(image, caption) for image, caption in zip(images, captions, strict=True)]
    assert sum(v.correct for v in verdicts) >= 6, [(c, v.reason) for c, v in zip(captions, verdicts, strict=True)]
