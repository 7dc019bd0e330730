"""The bundled CLIP tokenizer and architecture configs (air-gapped use)."""
import pytest
from transformers import CLIPTokenizer

from RadCLIPCore import RadCLIPError
from RadCLIPCore.encoders import (BUNDLED_CONFIGS, TOKENIZER_DIR, align_token_ids, bundled_clip_config,
                                  bundled_tokenizer, read_clip_config)


def test_bundled_tokenizer_has_openai_vocabulary_and_ids(tokenizer):
    assert len(tokenizer) == 49408
    # OpenAI's ids for these texts (CLIP's README example and special tokens)
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a photo of a dog")["input_ids"] == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert tokenizer.model_max_length == 77


def test_keyword_construction_trap_is_avoided():
    """transformers 5 builds a 2-token vocab from keyword paths; we pass them positionally."""
    broken = CLIPTokenizer(vocab_file=str(TOKENIZER_DIR / "vocab.json"), merges_file=str(TOKENIZER_DIR / "merges.txt"))
    assert len(broken) < 1000  # if this ever stops failing, the workaround can go
    assert len(bundled_tokenizer()) == 49408


def test_vit_large_patch14_config_is_the_papers_architecture():
    cfg = bundled_clip_config("clip-vit-large-patch14")
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (1024, 24, 16, 14, 224)
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.max_position_embeddings) == (768, 12, 49408, 77)
    assert cfg.projection_dim == 768
    assert {"clip-vit-large-patch14", "clip-vit-base-patch16", "clip-tiny"} <= set(BUNDLED_CONFIGS)


def test_every_bundled_config_pools_at_the_tokenizers_eos(tokenizer):
    for name in BUNDLED_CONFIGS:
        assert bundled_clip_config(name).text_config.eos_token_id == tokenizer.eos_token_id


def test_align_token_ids_fixes_a_mismatched_eos(tokenizer):
    cfg = bundled_clip_config("clip-tiny")
    cfg.text_config.eos_token_id = 2
    assert align_token_ids(cfg, tokenizer).text_config.eos_token_id == 49407


def test_tokenizer_and_model_vocab_mismatch_is_an_error(tokenizer):
    cfg = bundled_clip_config("clip-tiny")
    cfg.text_config.vocab_size = 1000
    with pytest.raises(RadCLIPError, match="49408 tokens"):
        align_token_ids(cfg, tokenizer)


def test_unknown_config_name_is_an_error(tmp_path):
    with pytest.raises(RadCLIPError, match="cannot read CLIP config"):
        read_clip_config(tmp_path / "nope.json")
