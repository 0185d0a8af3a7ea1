"""coldmail-webhooks: a receiver for Cold Mail Reseller webhooks."""
