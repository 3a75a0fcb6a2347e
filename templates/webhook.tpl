% rebase('dashboard.tpl', title='Webhook', here='webhooks')
<p><a href="/dashboard/webhooks">← All webhooks</a></p>
<h1 class="text">{{webhook['url']}}</h1>
% if secret:
<p class="error" role="alert"><strong>Copy the signing secret now: you will not see it again.</strong></p>
<div class="key">
  <label for="secret">Signing secret</label>
  <input id="secret" class="secret" readonly value="{{secret}}">
  <button type="button" class="copy secondary" data-copy="secret" hidden>Copy</button>
</div>
% end
<dl class="facts">
  <dt>Status</dt><dd id="webhook-status">{{webhook['status']}}{{(': ' + webhook['disabled_reason']) if webhook['disabled_reason'] else ''}}</dd>
  <dt>Events</dt><dd>{{', '.join(webhook['events'])}}</dd>
  <dt>Added</dt><dd>{{webhook['created_at']}}</dd>
</dl>
<form method="post" action="/dashboard/webhooks/{{webhook['webhook_id']}}" class="actions">
  <input type="hidden" name="csrf" value="{{csrf}}">
% if webhook['status'] == 'enabled':
  <button type="submit" name="action" value="test">Send a test event</button>
  <button type="submit" name="action" value="disable" class="secondary">Disable</button>
% else:
  <button type="submit" name="action" value="enable">Enable</button>
% end
  <details class="confirm" id="delete">
    <summary>Delete…</summary>
    <p>Deliveries still waiting are dropped, and a deleted endpoint cannot be brought back: Disable pauses it instead.</p>
    <button type="submit" name="action" value="delete" class="danger">Yes, delete this endpoint</button>
  </details>
</form>
<h2>Deliveries</h2>
% if not deliveries:
<p id="no-deliveries">None yet.</p>
% else:
<div class="scroll">
<table id="deliveries">
  <thead><tr><th scope="col">Event</th><th scope="col">Status</th><th scope="col">Attempts</th><th scope="col"></th></tr></thead>
  <tbody>
% for delivery in deliveries:
    <tr>
      <td>{{delivery['event_type']}}<br><span class="muted"><code>{{delivery['event_id']}}</code> · {{delivery['created_at']}}</span></td>
      <td>{{delivery['status']}}{{(' · next ' + delivery['next_attempt_at']) if delivery['next_attempt_at'] else ''}}</td>
      <td>
        <ol class="attempts">
% for attempt in delivery['attempts']:
          <li>{{attempt['started_at']}}: {{attempt['status_code'] or attempt['error']}} in {{attempt['duration_ms']}} ms</li>
% end
        </ol>
      </td>
      <td>
% if webhook['status'] == 'enabled' and delivery['status'] != 'delivering':
        <form method="post" action="/dashboard/webhooks/{{webhook['webhook_id']}}/deliveries/{{delivery['delivery_id']}}/redeliver">
          <input type="hidden" name="csrf" value="{{csrf}}">
          <button type="submit" class="secondary">Redeliver</button>
        </form>
% end
      </td>
    </tr>
% end
  </tbody>
</table>
</div>
% end
% if next_cursor:
<p><a href="/dashboard/webhooks/{{webhook['webhook_id']}}?cursor={{next_cursor}}" rel="next">Older deliveries</a></p>
% end
