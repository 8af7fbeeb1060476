"""Corpora prepared once and memory-mapped: `mpisplit prepare` writes token shards, a document
index and manifest.json; training reads windows of them.

    documents.py   the documents of the inputs (text files, JSONL lines, .gz, folders)
    tokenizer.py   a tokenizer folder: its files' sha256, vocabulary, eos id
    encode.py      batch encoding in worker processes
    shards.py      writing one split's token shards and document index
    conversations.py  chat conversations of JSONL lines (OpenAI's messages, ShareGPT's)
    chat_mask.py   a conversation rendered turn by turn: its tokens and loss mask
    chat_corpus.py `prepare --chat`: token shards and loss-mask shards
    prepare.py     the whole preparation, into a temporary folder renamed at the end
    manifest.py    manifest.json: reading, checking shards against it
    tokens.py      a split's shards memory-mapped read-only; windows copied out

Sits above models/ (the tokenizer loader) and below training/.
"""
