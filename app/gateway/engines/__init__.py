"""Who answers a request, under which policy."""
