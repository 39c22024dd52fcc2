"""ingest: corpus files -> chunks -> embeddings -> the KB's FAISS index (its format: kinject.core.index)."""
