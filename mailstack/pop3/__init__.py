"""pop3 package."""
