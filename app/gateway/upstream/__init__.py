"""The one upstream client (answers, breaker, big JSON in steps): may import settings and metrics only."""
