"""The one upstream client: answers, breaker; may import settings and metrics only."""
