"""Tiny offline models built at test time: a random Qwen2 with a ChatML tokenizer, and a LoRA adapter.

No model hub is reachable in CI. A random model gives meaningless text, but it runs
through exactly the same vLLM code paths (chat template, streaming, LoRA) in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You can return most items within 7 days of delivery.",
    "Refunds reach your card in 3 to 7 business days.",
    "Reset your password from the sign-in page with a verification code.",
    "七天无理由退货，退款原路退回，忘记密码可以重置。",
    "system user assistant customer service knowledge entries answer politely",
] * 20


def _token_id(tokenizer: Any, token: str) -> int:
    """The id of one special token."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):
        raise ValueError(f"{token!r} is not a single token")
    return token_id


def build_tiny_qwen2(dest: Path) -> Path:
    """Write a random 2-layer Qwen2 (hidden 128, head_dim 32) with a byte-level BPE ChatML tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    tokenizer.save_pretrained(dest)

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=640,  # >= tokenizer size, a multiple of 64
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: CPU attention needs >= 32
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=_token_id(tokenizer, "<|im_end|>"),
        bos_token_id=_token_id(tokenizer, "<|endoftext|>"),
        pad_token_id=_token_id(tokenizer, "<|endoftext|>"),
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    # A random init with std 0.02 yields near-uniform logits; larger weights make outputs
    # depend clearly on the input, so "adapter differs from base" is a meaningful check.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def build_tiny_lora(base_dir: Path, dest: Path, seed: int = 1, rank: int = 8, std: float = 0.3) -> Path:
    """Write a PEFT LoRA adapter for a Qwen2 model with random, non-zero A and B (normal, ``std``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random B too: an untrained adapter must still change outputs
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, std)
    peft_model.save_pretrained(str(dest))
    return dest


def build_tiny_cross_encoder(dest: Path, pairs: list[tuple[str, str, float]], steps: int = 300) -> Path:
    """Write a tiny BERT cross-encoder trained to give each (question, passage) pair its label.

    No reranker weights ship on PyPI, and a random cross-encoder scores every pair alike.
    This one learns the given pairs by heart in a few seconds, so a test can say which
    passage a question must end up with and which question must find nothing.

    Args:
        dest: Folder to write (FlagEmbedding's ``FlagReranker`` loads it).
        pairs: (question, passage, label): 1.0 when the passage answers the question, else 0.0.
        steps: Full-batch training steps.

    """
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # Bert's normalizer splits CJK text into characters, so Chinese pairs tokenize too.
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    texts = [text for question, passage, _ in pairs for text in (question, passage)]
    wordpiece.train_from_iterator(texts + CORPUS, trainers.WordPieceTrainer(vocab_size=800, special_tokens=specials))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )  # fmt: skip
    tokenizer.save_pretrained(dest)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=wordpiece.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512,
    )  # fmt: skip
    config.num_labels = 1  # one relevance logit (the transformers stubs do not list it as an argument)
    model = BertForSequenceClassification(config)
    batch = tokenizer([q for q, _, _ in pairs], [p for _, p, _ in pairs], padding=True, return_tensors="pt")
    labels = torch.tensor([label for _, _, label in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(**batch).logits.view(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(dest, safe_serialization=True)
    return dest
