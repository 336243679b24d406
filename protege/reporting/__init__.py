"""Reporting: the typed report (:mod:`.model`), report.html (:mod:`.html`), its plots, run comparison and the
baseline page. Everything here reads report data; nothing here trains or calls a teacher."""
