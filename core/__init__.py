"""What every kinject stage shares: settings, the KB store, model loading, engines, retrieval."""
