"""ui: the Gradio chat, compare and KB tabs."""
