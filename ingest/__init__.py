"""ingest: corpus files -> chunks -> embeddings -> FAISS index; SPA augmentation in ingest.augment."""
