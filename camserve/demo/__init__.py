"""``make demo``: the small shapes CNN (:mod:`.shapes`), the end-to-end run (:mod:`.run`)
and the contact sheet of its pictures (:mod:`.sheet`)."""
