"""The Label Studio format at the bottom of the stack: label configs, ids, results, brush RLE, REST client, tokens."""
