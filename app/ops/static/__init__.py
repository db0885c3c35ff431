"""Static assets of the status page (plain HTML/CSS/JS, shipped in the package, no build step)."""
