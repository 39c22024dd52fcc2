"""kinject: one corpus in, a FAISS index and a fine-tuned model out, one OpenAI-compatible service in front.

The folders of the repository are its subpackages (see README, Layout): `kinject.core` is the
ground every stage stands on; `kinject.ingest`, `kinject.augment` and `kinject.finetune` are the
stages; `kinject.service`, `kinject.ui` and `kinject.eval` are the front ends; `kinject.recipes`
chains them; `kinject.cli` is the command.
"""

__version__ = "0.1.0"
