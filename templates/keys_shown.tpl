% rebase('dashboard.tpl', title='Your keys', here='keys')
<h1>{{'Your API key' if len(keys) == 1 else 'Your API keys'}}</h1>
<p class="error" role="alert"><strong>Copy {{'it' if len(keys) == 1 else 'them'}} now: you will not see {{'it' if len(keys) == 1 else 'these'}} again.</strong>
Only a digest is stored; if you lose a key, rotate it.</p>
% for n, (label, key) in enumerate(keys):
<div class="key">
  <label for="key-{{n}}">{{label}}</label>
  <input id="key-{{n}}" class="secret" readonly value="{{key}}">
  <button type="button" class="copy secondary" data-copy="key-{{n}}" hidden>Copy</button>
</div>
% end
% if endpoints:
<div id="endpoints-to-check">
<p><strong>The old key set the address or secret of {{'this webhook endpoint' if len(endpoints) == 1 else 'these webhook endpoints'}}</strong>,
which still receive{{'s' if len(endpoints) == 1 else ''}} your events and the links that answer your pauses. If the key leaked,
check where {{'it points' if len(endpoints) == 1 else 'they point'}}, and change {{'its secret' if len(endpoints) == 1 else 'their secrets'}}:</p>
<ul>
% for endpoint in endpoints:
  <li><a href="/dashboard/webhooks/{{endpoint['webhook_id']}}" class="text">{{endpoint['url']}}</a></li>
% end
</ul>
</div>
% end
% if test_key:
<p>Try it: ask for an approval with the test key (test pauses never text or email anyone; open the
<code>respond_url</code> it returns to answer as the human would):</p>
<pre class="text" id="try-it">curl -X POST {{base}}/v1/pause \
  -H "Authorization: Bearer {{test_key}}" \
  -H "Content-Type: application/json" \
  -d '{"recipient": "+15550100", "channel": "sms", "message": "Your agent wants to send a $340 wire to Acme Corp. Approve?", "options": ["Approve", "Reject"], "timeout_hours": 4, "timeout_default": "Reject"}'</pre>
% end
<p><a href="/dashboard/overview">Go to the dashboard</a></p>
