"""`mediround app`: the multi-round session in a local web page (docs/app.md)."""
