"""The baseline every benchmark compares against: the naive transformers TTE pipeline.

What a user without tte_engine would run: transformers' processor recipe (chat template,
image processor, tokenizer), a batched greedy `generate()` for the traces, then a SECOND full
forward over query + trace + suffix (image included) for the last-token embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tte_engine.vision import ImageProcessorConfig


class NaivePipeline:
    def __init__(self, checkpoint, *, think_start: str, suffix_ids: list[int], stop_ids: list[int], suppress_ids: list[int],
                 instruction: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
        self.tok = AutoTokenizer.from_pretrained(checkpoint)
        cfg = ImageProcessorConfig.load(checkpoint)
        self.images = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        self.think_start, self.suffix_ids, self.stop_ids = think_start, suffix_ids, stop_ids
        self.suppress_ids, self.instruction, self.device = suppress_ids, instruction, device
        self.image_token_id = self.model.config.image_token_id
        self.pad_id = self.tok.pad_token_id

    def _prompt(self, item) -> tuple[list[int], object]:
        item = {"text": item} if isinstance(item, str) else item
        image = item.get("image")
        text = self.instruction + ("\n" + item["text"] if item.get("text") else "")
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
        rendered = self.tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        if image is not None:
            grid = self.images(images=[image])["image_grid_thw"][0]
            rendered = rendered.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4))
        return self.tok(rendered + self.think_start, add_special_tokens=False).input_ids, image

    def _batch(self, seqs: list[list[int]], images: list) -> dict:
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # left padding, as generate() needs
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        present = [im for im in images if im is not None]
        if present:
            px = self.images(images=present, return_tensors="pt")
            batch.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"], mm_token_type_ids=(ids == self.image_token_id).int())
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def __call__(self, items, max_new_tokens: int) -> tuple[torch.Tensor, list[list[int]]]:
        prompts, images = zip(*(self._prompt(it) for it in items))
        batch = self._batch(list(prompts), list(images))
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
                                  suppress_tokens=self.suppress_ids, pad_token_id=self.pad_id)
        traces = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in self.stop_ids), len(row))
            traces.append(row[:cut])
        think_end = self.stop_ids[0]
        full = [list(p) + t + ([] if t and t[-1] == think_end else [think_end]) + self.suffix_ids for p, t in zip(prompts, traces)]
        second = self._batch(full, list(images))  # the naive pipeline's second pass: re-encode everything
        hidden = self.model.model(**second).last_hidden_state[:, -1]
        return F.normalize(hidden.float(), dim=-1), traces
