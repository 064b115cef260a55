"""sigscale.curation: URL lists -> filtered, deduplicated, language-balanced webdataset shards.

sources (read lists) -> text_filters -> download (img2dataset) -> image_filters (+ score) ->
balance -> manifest (shards); pipeline runs it in resumable parts, report writes report.md and report.html,
serve and synthetic make the loopback test and demo data.
"""
