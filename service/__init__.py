"""service: OpenAI-compatible HTTP server answering in base / rag / ft / ft-rag / auto modes."""
