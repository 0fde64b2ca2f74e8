"""What a run reads: the user's rows in any accepted format, tokenized with labels on the response only (rows), and the
model and tokenizer, the user's or a built-in one (loading).
"""
